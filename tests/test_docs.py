"""The documentation stays honest: README.md, docs/*.md and the examples' READMEs are checked against the code.

- every relative link resolves to a file or folder of the repository, and every ``#anchor`` to a heading of the
  target page (GitHub's anchor rules: lower case, punctuation dropped, spaces to hyphens, ``-1``, ``-2`` for
  repeats);
- every fenced ``yaml`` block that configures one of our merge methods parses, is a valid mergekit
  configuration and passes :func:`mergekit_wudi.validation.check_merge_config` (model paths and LwPTV mask files
  are placeholders); a block that adds ``WUDIMergeCallback`` to ``trainer.callbacks`` constructs it and checks
  its parameters;
- every fenced ``python`` block right after a ``<!-- runnable -->`` line runs, in a fresh temporary folder,
  within seconds on tiny models; every page of docs/ opens with one;
- every ``tests/<file>.py::<test>`` a page names exists;
- every generated results region equals what the benchmarks' report code renders from the committed JSON
  (``python benchmarks/update_docs.py`` rewrites them).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "examples").glob("**/README.md"))]
RUNNABLE = "<!-- runnable -->"
FENCE = re.compile(r"^(```+)([^\n`]*)\n(.*?)^\1[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
TEST_REFERENCE = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def blocks(path: Path):
    """(info string, code, line number, the line before the fence) of every fenced code block."""
    text = path.read_text()
    for match in FENCE.finditer(text):
        start = text.count("\n", 0, match.start())
        previous = text.splitlines()[start - 1].strip() if start else ""
        yield match.group(2).strip(), match.group(3), start + 1, previous


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code (links there are not links)."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return re.sub(r"`[^`\n]*`", "", text)


def github_anchors(path: Path) -> set:
    """The anchors GitHub gives the headings of a markdown file."""
    seen: dict = {}
    anchors = set()
    for line in FENCE.sub("", path.read_text()).splitlines():  # a "# comment" in a code block is no heading
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        title = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1))  # a link's text only
        title = re.sub(r"<[^>]+>", "", title).replace("`", "")
        anchor = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        anchors.add(anchor if count == 0 else f"{anchor}-{count}")
    return anchors


def test_github_anchor_rules():
    page = ROOT / "docs" / "yaml-method.md"
    assert {"the-yaml-method-merge_method-wudi", "parameters", "how-mergekit-finds-the-method"} <= github_anchors(page)


def links():
    for path in DOCS:
        for match in LINK.finditer(prose(path.read_text())):
            target = match.group(1)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # not http:, https:, mailto:
                yield pytest.param(path, target, id=f"{relative(path)}->{target}")


@pytest.mark.parametrize("path, target", list(links()))
def test_relative_link_resolves(path, target):
    file_part, _, anchor = target.partition("#")
    resolved = (path.parent / file_part).resolve() if file_part else path
    assert resolved.exists(), f"{relative(path)}: link {target!r}: {resolved} does not exist"
    assert ROOT in resolved.parents or resolved == ROOT, f"{relative(path)}: link {target!r} leaves the repository"
    if anchor:
        assert resolved.suffix == ".md", f"{relative(path)}: link {target!r}: an anchor into a non-markdown file"
        anchors = github_anchors(resolved)
        assert anchor in anchors, f"{relative(path)}: link {target!r}: no heading with that anchor; {sorted(anchors)}"


def test_the_readme_is_read_in_five_minutes():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250, "README.md: move detail into docs/"


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert f"](docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"


# ------------------------------------------------------------------------------------------------ YAML blocks


def yaml_blocks():
    for path in DOCS:
        for info, code, line, _ in blocks(path):
            if info.split()[:1] in (["yaml"], ["yml"]):
                yield pytest.param(code, id=f"{relative(path)}:{line}")


@pytest.fixture
def placeholder_mask_files(monkeypatch):
    """LwPTV mask files named in the docs are placeholders: the config check may not read them."""
    import mergekit_wudi.lwptv_masks as lwptv_masks

    monkeypatch.setattr(lwptv_masks, "load_mask_file", lambda path: {})


@pytest.mark.parametrize("code", list(yaml_blocks()))
def test_yaml_block_passes_our_checks(code, placeholder_mask_files):
    import mergekit_wudi
    from mergekit.config import MergeConfiguration

    from mergekit_wudi.registration import method_names
    from mergekit_wudi.validation import check_merge_config, check_parameters

    mergekit_wudi.register_methods()
    raw = yaml.safe_load(code)
    assert isinstance(raw, dict), "a YAML block of the docs is a mapping"
    if "merge_method" in raw:
        assert raw["merge_method"] in method_names(), f"merge_method {raw['merge_method']!r} is not one of ours"
        MergeConfiguration.model_validate(raw)
        check_merge_config(raw)
        return
    callbacks = (raw.get("trainer") or {}).get("callbacks") or []
    ours = [c for c in callbacks if c.get("class_path") == "mergekit_wudi.lightning.WUDIMergeCallback"]
    assert ours, "a YAML block that configures neither a merge nor the callback"
    from mergekit_wudi.lightning import WUDIMergeCallback

    for entry in ours:
        callback = WUDIMergeCallback(**entry.get("init_args", {}))
        check_parameters(callback.method, callback.parameters)


def test_the_docs_have_yaml_blocks_of_our_methods():
    methods = {yaml.safe_load(p.values[0]).get("merge_method") for p in yaml_blocks()}
    assert {"wudi", "preprocessed_ties"} <= methods


# ----------------------------------------------------------------------------------------- runnable snippets


def runnable_blocks():
    for path in DOCS:
        for info, code, line, previous in blocks(path):
            if previous == RUNNABLE:
                assert info.split()[:1] == ["python"], f"{relative(path)}:{line}: {RUNNABLE} before a non-python block"
                yield pytest.param(code, id=f"{relative(path)}:{line}")


def test_every_docs_page_opens_with_a_runnable_snippet():
    for page in sorted((ROOT / "docs").glob("*.md")):
        first = next(blocks(page), None)
        assert first is not None and first[3] == RUNNABLE, f"docs/{page.name}: the first code block is not runnable"


@pytest.mark.parametrize("code", list(runnable_blocks()))
def test_runnable_snippet_runs(code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # the snippets call `mergekit-yaml`: the one of this interpreter's environment, and this checkout's package
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exec(compile(code, "<docs snippet>", "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out.strip() or any(tmp_path.iterdir()), "the snippet printed and wrote nothing"


# -------------------------------------------------------------------------------------- named tests, tables


def test_named_tests_exist():
    named = 0
    for path in DOCS:
        for file, name in TEST_REFERENCE.findall(path.read_text()):
            source = ROOT / file
            assert source.exists(), f"{relative(path)} names {file}, which does not exist"
            assert re.search(rf"^def {name}\(", source.read_text(), re.M), f"{relative(path)} names {file}::{name}"
            named += 1
    assert named >= 20  # the troubleshooting tables name a test per row


def test_generated_regions_equal_the_report_code_on_the_committed_results():
    from benchmarks.update_docs import doc_files, regions_in, render_regions, rewrite

    rendered = render_regions()
    found = set()
    for path in doc_files():
        text = path.read_text()
        found |= set(regions_in(text))
        assert rewrite(text, rendered, relative(path)) == text, (
            f"{relative(path)}: a results table differs from the JSON; run python benchmarks/update_docs.py")
    assert found == set(rendered), f"regions rendered but shown nowhere: {sorted(set(rendered) - found)}"


def test_a_stale_region_is_detected():
    from benchmarks.update_docs import rewrite

    stale = "text\n<!-- generated: mudsc -->\n| a hand-edited table |\n<!-- end generated -->\n"
    rendered = {"mudsc": "| the rendered table |\n"}
    assert rewrite(stale, rendered) != stale
    assert "| the rendered table |" in rewrite(stale, rendered)
    with pytest.raises(KeyError, match="unknown generated region 'nope'"):
        rewrite("<!-- generated: nope -->\n<!-- end generated -->", rendered, "x.md")
