"""Write the tiny random Llama of the test suite (and a small text file) to a folder: the model of tiny-test.yaml.

    .venv/bin/python deployments/make_tiny_model.py runs/tiny-model
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_io import TEXT, save_tiny  # noqa: E402


def main(folder: str) -> None:
    path = Path(folder)
    save_tiny(path)
    (path / "text.txt").write_text(TEXT)
    print(path.resolve())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-model")
