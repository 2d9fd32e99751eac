"""Where every benchmark leaves its result: bench/results/NAME.json (the numbers) and NAME.md (the table a
reader looks at), both written together so the two never disagree."""

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def save(name: str, result: object, markdown: str, results: Path = RESULTS) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (results / f"{name}.md").write_text(markdown)
    print(markdown)
