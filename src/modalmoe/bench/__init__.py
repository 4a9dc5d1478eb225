"""The benchmark: suites, compute matching, runner, results store, statistics, leaderboard."""
