"""Compare two bench results.jsonl files record by record, on every field except timings and
the environment (how issue 18's "behaviour unchanged" was checked):

    python benchmarks/compare_results.py BEFORE/results.jsonl AFTER/results.jsonl
"""

import json
import sys

SKIP = {"environment", "throughput"}


def load(path):
    records = {}
    for line in open(path, encoding="utf-8"):
        record = json.loads(line)
        records[(record["task"], record["design"], record["seed"])] = record
    return records


def timeless(x):
    """``x`` without timing fields (seconds, latency, milliseconds) and the environment."""
    if isinstance(x, dict):
        return {
            k: timeless(v)
            for k, v in x.items()
            if k not in SKIP and "seconds" not in k and "latency" not in k and "_ms" not in k
        }
    if isinstance(x, list):
        return [timeless(v) for v in x]
    return x


def main(before_path, after_path):
    before, after = load(before_path), load(after_path)
    if before.keys() != after.keys():
        print("different cells:", sorted(set(before) ^ set(after)))
        return 1
    differ = 0
    for key in before:
        a, b = timeless(before[key]), timeless(after[key])
        if a != b:
            differ += 1
            for field in sorted(set(a) | set(b)):
                if a.get(field) != b.get(field):
                    print(key, field, "\n  before:", json.dumps(a.get(field))[:300])
                    print("  after: ", json.dumps(b.get(field))[:300])
    fields = sorted({f for r in before.values() for f in timeless(r)})
    print(f"{len(before)} records, {differ} differ; fields compared: {', '.join(fields)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
