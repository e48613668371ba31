"""MkDocs hook (mkdocs.yml `hooks:`): the benchmark journal lives in benchmarks/README.md beside its scripts and
raw results, and docs/benchmarks/index.md includes it. Its links (`results/quality.json`, `screen.py`) are
relative to benchmarks/, so the files they name are added to the site under benchmarks/ too, from where they are:
one copy of each file, and `mkdocs build --strict` checks every such link. Its links to documentation pages,
`../docs/serving.md` (right when the file is read in the repository), are rewritten to the site's `../serving.md`.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]


def on_files(files: Files, config) -> Files:
    site = config["site_dir"]
    # the raw results (recursively) and the scripts (top level only)
    for path in sorted((ROOT / "benchmarks" / "results").rglob("*")) + sorted((ROOT / "benchmarks").glob("*.py")):
        if path.is_file():
            src_uri = path.relative_to(ROOT).as_posix()
            files.append(File(src_uri, src_dir=str(ROOT), dest_dir=site, use_directory_urls=config["use_directory_urls"]))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Runs after include-markdown (hooks come after the plugins): the journal's `](../docs/X)` -> `](../X)`."""
    if page.file.src_uri == "benchmarks/index.md":
        return re.sub(r"\]\(\.\./docs/", "](../", markdown)
    return markdown
