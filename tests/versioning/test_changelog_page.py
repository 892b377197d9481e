"""The example gateway's API versions page is generated from its version bundle."""

from __future__ import annotations

from pathlib import Path

from example_app.app import api_changelog

PAGE = Path(__file__).resolve().parents[2] / "docs" / "api-versions.md"


def test_the_docs_page_is_the_generated_changelog() -> None:
    """Regenerate with: ``.venv/bin/python -c "from example_app.app import api_changelog;
    print(api_changelog(), end='')" > docs/api-versions.md``."""
    assert PAGE.read_text() == api_changelog()
