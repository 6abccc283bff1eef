"""What a person reads in a component of the page, without Gradio's progress overlay.

While an event runs, Gradio lays a status tracker ("processing | 0.2s") over each of its output
components; a component's `innerText` then starts with that timer, and a test reading it at that
moment sees text the person does not read as the component's content. These helpers read every
child of the component but the tracker.
"""

SHOWN = (
    "(selector => { const el = document.querySelector(selector); if (!el) return '';"
    " return Array.from(el.children).filter(c => c.dataset.testid !== 'status-tracker')"
    ".map(c => c.innerText).join('\\n'); })"
)


def shown(page, selector: str) -> str:
    """The component's text without the progress overlay."""
    return page.evaluate(f"{SHOWN}({selector!r})")


def wait_shown(page, selector: str, needle: str, timeout: float = 60_000) -> None:
    """Wait until the component's own text (not its overlay) contains `needle`."""
    page.wait_for_function(f"{SHOWN}({selector!r}).includes({needle!r})", timeout=timeout)
