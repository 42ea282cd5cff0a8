"""The CoLM selection engine: a library with no service code in it.

    selector = build_selector(model, SelectorConfig(strategy="colm", batch_size=32))
    sel = selector.select(batch, step=t)   # sel.indices, sel.weights, sel.stats
"""

from colm_server.select.batch import TokenBatch
from colm_server.select.config import SelectorConfig
from colm_server.select.selector import Selection, Selector, build_selector

__all__ = ["Selection", "Selector", "SelectorConfig", "TokenBatch", "build_selector"]
