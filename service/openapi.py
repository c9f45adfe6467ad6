"""Write the app's OpenAPI document: `python -m service.openapi [openapi.yaml]`.

`tests/test_openapi.py` fails when the committed file and the app differ.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml


def app_schema() -> dict[str, Any]:
    from service.app import create_app
    from service.settings import Settings

    return create_app(Settings()).openapi_schema.to_schema()


def main(argv: list[str] | None = None) -> None:
    target = Path((argv or sys.argv[1:] or ["openapi.yaml"])[0])
    target.write_text(yaml.safe_dump(app_schema(), sort_keys=False, allow_unicode=True))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
