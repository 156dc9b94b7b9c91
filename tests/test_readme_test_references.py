"""Every test the README names exists, so a README promise cannot outlive the test that shows it.

References look like `tests/a/test_x.py`, `tests/a/test_x.py::test_name`, a bare file name
`test_x.py::test_name` (resolved anywhere under tests/, and it must be unique), or `::test_name`
(the previous file's test).
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = re.compile(r"`((?:tests/(?:\w+/)*)?test_\w+\.py)?(::test_\w+)?(?:\[[^\]`]*\])?`")


def readme_references():
    """[(line number, file part or None, test name or None)] for each backticked test reference."""
    found = []
    for number, line in enumerate((ROOT / "README.md").read_text().splitlines(), start=1):
        for match in REFERENCE.finditer(line):
            file_part, test_part = match.group(1), match.group(2)
            if file_part or test_part:
                found.append((number, file_part, test_part[2:] if test_part else None))
    return found


def resolve(file_part):
    if "/" in file_part:
        path = ROOT / file_part
        return [path] if path.is_file() else []
    return sorted((ROOT / "tests").rglob(file_part))


def defines(path, test_name):
    return re.search(rf"^def {test_name}\(", path.read_text(), flags=re.MULTILINE) is not None


def test_every_test_the_readme_names_exists():
    references = readme_references()
    assert len(references) > 20, "the README names tests; the pattern no longer finds them"
    problems, previous_file = [], None
    for line, file_part, test_name in references:
        if file_part:
            paths = resolve(file_part)
            if len(paths) != 1:
                problems.append(f"README.md:{line}: `{file_part}` matches {len(paths)} files under tests/")
                continue
            previous_file = paths[0]
        if test_name:
            if previous_file is None or not defines(previous_file, test_name):
                where = previous_file.relative_to(ROOT) if previous_file else "no file named before it"
                problems.append(f"README.md:{line}: `{test_name}` is not defined in {where}")
    assert not problems, "\n".join(problems)
