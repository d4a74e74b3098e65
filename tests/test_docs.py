"""The documentation: the generated pages are what the code generates today, every relative link
resolves, the README stays a front door, and specs/README.md lists every shipped spec."""
import glob
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import make_docs  # noqa: E402  (scripts/)

PAGES = ['README.md', 'specs/README.md', 'results/README.md', *sorted(glob.glob('docs/*.md', root_dir=ROOT))]


def _read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


@pytest.mark.parametrize('page', sorted(make_docs.PAGES))
def test_generated_pages_are_current(page):
    if page == 'docs/cli.md' and sys.version_info[:2] != make_docs.PYTHON:
        pytest.skip(f'argparse formats help differently across Python versions; docs/cli.md is made with '
                    f'Python {".".join(map(str, make_docs.PYTHON))}')
    assert _read(page) == make_docs.PAGES[page](), f'{page} is stale: run python scripts/make_docs.py'


@pytest.mark.parametrize('page', PAGES)
def test_every_relative_link_resolves(page):
    """Links and images, with an anchor checked against the target page's headings."""
    text = _read(page)
    for target in re.findall(r'\]\(([^)\s]+)\)', text):
        if re.match(r'[a-z]+://', target) or target.startswith('mailto:'):
            continue
        path, _, anchor = target.partition('#')
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        assert os.path.exists(os.path.join(ROOT, resolved)), f'{page}: {target} -> {resolved}: no such file'
        if anchor and resolved.endswith('.md'):
            headings = re.findall(r'^#+ (.+)$', _read(resolved), flags=re.M)
            slugs = {re.sub(r'[^\w\- ]', '', h.strip().lower()).replace(' ', '-') for h in headings}
            assert anchor in slugs, f'{page}: {target}: no heading #{anchor} in {resolved}'


def test_the_readme_is_a_front_door():
    readme = _read('README.md')
    assert readme.count('\n') <= 250
    assert 'make quickstart' in readme and 'make test' in readme
    for page in glob.glob('docs/*.md', root_dir=ROOT):  # every page reachable from it
        assert f'({page})' in readme, f'README.md does not link {page}'


def test_specs_readme_lists_every_spec():
    listed = set(re.findall(r'^\| `([\w.-]+\.yaml)` \|', _read('specs/README.md'), flags=re.M))
    assert listed == {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, 'specs', '*.yaml'))}
