"""Command groups of the ``modalmoe`` command line that live in their own files (``modalmoe data``,
``modalmoe presets``); ``modalmoe.cli`` attaches them. The command line is the top floor: these
may import any room."""
