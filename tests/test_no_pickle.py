"""No pickle anywhere in lbridge: tensors are safetensors, and the one checkpoint format that needs
torch.load (third-party .pt/.pth weights) is read with weights_only=True, which refuses objects.

Scanned: every .py file under lbridge/, scripts/ and tests/. This file is skipped: it names the
patterns it looks for. Lines in tests that build a malicious pickle on purpose (to check lbridge
refuses it) must say so with `# pickle-scan: deliberate`.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = r"(c?pickle|dill|cloudpickle|joblib|shelve|marshal)"
PICKLE = re.compile(rf"^\s*(import|from)\s+{MODULES}\b|\b{MODULES}\.\w+")
TORCH_LOAD = re.compile(r"torch\.load\(")
TORCH_SAVE = re.compile(r"torch\.save\(")  # writes a pickle: lbridge writes safetensors
DELIBERATE = "# pickle-scan: deliberate"


def sources() -> list[Path]:
    here = Path(__file__).resolve()
    return [p for d in ("lbridge", "scripts", "tests") for p in sorted((ROOT / d).rglob("*.py")) if p != here]


def calls(text: str, start: int) -> str:
    """The text of the call opened at `start` (up to its matching parenthesis)."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0 and text[i] == ")":
            return text[start : i + 1]
    return text[start:]


def violations(path: Path, root: Path = ROOT) -> list[str]:
    """`file:line: text` of each pickle use. Tests may torch.save .pth fixtures (the format third-party
    weights come in, which lbridge must read safely); lbridge/ and scripts/ may not."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    name = path.relative_to(root)
    found = [f"{name}:{n}: {line.strip()}" for n, line in enumerate(lines, 1)
             if PICKLE.search(line) and DELIBERATE not in line]  # fmt: skip
    for match in TORCH_LOAD.finditer(text):
        n = text.count("\n", 0, match.start()) + 1
        if "weights_only=True" not in calls(text, match.end() - 1) and DELIBERATE not in lines[n - 1]:
            found.append(f"{name}:{n}: torch.load without weights_only=True")
    if name.parts[0] != "tests":
        found += [
            f"{name}:{text.count(chr(10), 0, m.start()) + 1}: torch.save" for m in TORCH_SAVE.finditer(text)
        ]
    return found


def test_no_pickle_and_no_torch_load_without_weights_only():
    assert len(sources()) > 50  # the scan sees the code base
    found = [v for path in sources() for v in violations(path)]
    assert found == [], "\n".join(found)


def test_the_scan_catches_what_it_looks_for(tmp_path):
    (tmp_path / "lbridge").mkdir()
    bad = tmp_path / "lbridge" / "bad.py"
    bad.write_text(
        "import pickle\nfrom cloudpickle import dumps\nx = pickle.loads(b'')\n"
        "y = torch.load(path)\nz = torch.load(\n    path, map_location='cpu'\n)\n"
        "ok = torch.load(path, weights_only=True)\ntorch.save(state, 'x.pt')\n"
    )
    assert [v.split(":")[1] for v in violations(bad, tmp_path)] == ["1", "2", "3", "4", "5", "9"]
