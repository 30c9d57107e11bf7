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


def hunks():
    v1, v2 = code_lines("dreamer_v1.py"), code_lines("dreamer_v2.py")
    matcher = difflib.SequenceMatcher(None, v1, v2, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag != "equal":
            yield v1[i1:i2], v2[max(j1 - 1, 0):j2 + 1], (i1 + 1, j1 + 1)


def test_every_hunk_is_marked():
    unmarked = [f"v1 line {i}, v2 line {j}: {(old or new)[:2]}"
                for old, new, (i, j) in hunks() if not any("V2" in line for line in new)]
    assert not unmarked, "unmarked differences:\n" + "\n".join(unmarked)


def test_the_check_catches_an_unmarked_change():
    # The check itself must be able to fail: an edit without a mark is found.
    v1 = ["a = 1", "b = 2", "c = 3", "d = 4"]
    v2 = ["a = 1", "b = 5", "c = 3", "d = 4"]
    ops = difflib.SequenceMatcher(None, v1, v2).get_opcodes()
    changed = [v2[max(j1 - 1, 0):j2 + 1] for tag, _, _, j1, j2 in ops if tag != "equal"]
    assert changed and not any("V2" in line for block in changed for line in block)


def test_the_files_share_their_section_order():
    banner = lambda text: [l for l in text.splitlines() if l.startswith("# ") and ". " in l[:6]]  # noqa: E731
    v1 = banner((ROOT / "dreamer_v1.py").read_text())
    v2 = banner((ROOT / "dreamer_v2.py").read_text())
    assert [l.split(".")[0] for l in v1] == [l.split(".")[0] for l in v2] and len(v1) >= 8
