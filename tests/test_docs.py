"""The README and docs/: every relative link and image points to a file, and the set-up's commands
are CI's."""

import re
import shlex

import pytest
from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# [text](target) and ![alt](target)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def relative_links(page):
    """The targets of the page's links and images that name a file of this repository."""
    targets = [target.split("#")[0] for target in LINK.findall(page.read_text(encoding="utf-8"))]
    # not http:, mailto:, ...
    return [t for t in targets if t and not re.match(r"[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_relative_link_and_image_points_to_a_file_that_exists(page):
    links = relative_links(page)
    missing = [target for target in links if not (page.parent / target).exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"


def test_the_readme_links_to_every_page_in_docs():
    linked = {(ROOT / target).resolve() for target in relative_links(ROOT / "README.md")}
    assert {page.resolve() for page in PAGES[1:]} <= linked


def ci_setting(name):
    """A variable of .ci/run, as the shell reads it: NAME="value"."""
    match = re.search(rf"^{name}=(.*)$", (ROOT / ".ci" / "run").read_text(), re.M)
    assert match, f".ci/run sets no {name}"
    return " ".join(shlex.split(match[1]))


def test_the_readmes_two_set_up_commands_are_the_ones_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    set_up = readme[readme.index("## Set up and run") :]
    set_up = set_up[: set_up.index("\n## ", 1)]
    commands = re.findall(r"```bash\n(.*?)\n```", set_up, re.S)[:2]  # install + run, install + test
    install, test = ci_setting("INSTALL"), ci_setting("TEST")
    assert commands == [f"{install} && python main.py", f"{install} && {test}"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert '/bin/"$INSTALL ' in ci and '/bin/"$TEST ' in ci  # and CI runs them, in each venv
