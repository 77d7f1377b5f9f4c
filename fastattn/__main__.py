"""``python -m fastattn``: version, build and which backends are usable here (and why not)."""

from fastattn._dispatch import describe

if __name__ == "__main__":
    print(describe())
