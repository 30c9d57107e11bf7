"""`diff dreamer_v1.py dreamer_v2.py` must read as the V2 paper's list of changes: every changed
block carries a `V2` mark (a `# V2:` comment, or "V2" in the changed docstring) in it or on the
line right next to it. An unmarked hunk is an unexplained difference between the two files."""

import difflib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def code_lines(name):
    """The file's lines after its module docstring (the docstrings name each file's own paper)."""
    lines = (ROOT / name).read_text().splitlines()
    end = next(i for i, line in enumerate(lines[1:], 1) if line.startswith('"""'))
    return lines[end + 1:]


def hunks(v1, v2):
    """Each changed block: (V1 lines, the V2 lines with one neighbour on each side, line numbers)."""
    matcher = difflib.SequenceMatcher(None, v1, v2, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag != "equal":
            yield v1[i1:i2], v2[max(j1 - 1, 0):j2 + 1], (i1 + 1, j1 + 1)


def unmarked_hunks(v1, v2):
    return [f"v1 line {i}, v2 line {j}: {(old or new)[:2]}"
            for old, new, (i, j) in hunks(v1, v2) if not any("V2" in line for line in new)]


def test_every_hunk_is_marked():
    unmarked = unmarked_hunks(code_lines("dreamer_v1.py"), code_lines("dreamer_v2.py"))
    assert not unmarked, "unmarked differences:\n" + "\n".join(unmarked)


def test_the_check_catches_an_unmarked_change():
    """The real checker on small files: an unmarked edit, insertion or deletion is found; a
    marked one, or one next to a marked line, is not."""
    v1 = ["a = 1", "b = 2", "c = 3", "d = 4", "e = 5", "f = 6", "g = 7"]
    edited = ["a = 1", "b = 5", "c = 3", "d = 4", "e = 5", "f = 6", "g = 7"]
    inserted = ["a = 1", "b = 2", "c = 3", "x = 0", "d = 4", "e = 5", "f = 6", "g = 7"]
    deleted = ["a = 1", "b = 2", "c = 3", "d = 4", "f = 6", "g = 7"]
    for v2 in (edited, inserted, deleted):
        assert len(unmarked_hunks(v1, v2)) == 1, v2
    marked = ["a = 1", "b = 5  # V2: why", "c = 3", "d = 4", "e = 5", "f = 6", "g = 7"]
    next_to_mark = ["a = 1", "# V2: the next line changes", "b = 5", "c = 3", "d = 4", "e = 5",
                    "f = 6", "g = 7"]
    assert unmarked_hunks(v1, marked) == [] and unmarked_hunks(v1, next_to_mark) == []
    # Two separate unmarked edits are two findings, however far apart.
    assert len(unmarked_hunks(v1, ["a = 1", "b = 9", "c = 3", "d = 4", "e = 5", "f = 9", "g = 7"])) == 2


def test_the_files_share_their_section_order():
    banner = lambda text: [l for l in text.splitlines() if l.startswith("# ") and ". " in l[:6]]  # noqa: E731
    v1 = banner((ROOT / "dreamer_v1.py").read_text())
    v2 = banner((ROOT / "dreamer_v2.py").read_text())
    assert [l.split(".")[0] for l in v1] == [l.split(".")[0] for l in v2] and len(v1) >= 8
