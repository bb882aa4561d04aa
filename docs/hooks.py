"""MkDocs hook: the docstrings' Transformers-style references, [`Name`] and [`~Name.member`], become links on the API
page where they name something it documents, and plain code elsewhere (the site has no page for private helpers)."""

import re

REFERENCE = re.compile(r"\[<code>~?([\w.]+)</code>\]")
ANCHOR = re.compile(r'id="(palme_hf\.[\w.]+)"')


def on_page_content(html: str, page, config, files) -> str:
    """Replaces each reference in the page's HTML, after mkdocstrings rendered the docstrings."""
    documented = set(ANCHOR.findall(html))

    def replace(match: re.Match) -> str:
        name = match.group(1)
        code = f"<code>{name.split('.')[-1] if match.group(0).startswith('[<code>~') else name}</code>"
        target = f"palme_hf.{name}"
        return f'<a href="#{target}">{code}</a>' if target in documented else code

    return REFERENCE.sub(replace, html)
