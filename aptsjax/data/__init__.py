"""Batch layouts for APTS (host-side, NumPy): subdomain blocks with their overlap, SAPTS
minibatches and streams of minibatches.

* ``aptsjax.data.layout``: the split of a batch into N subdomain blocks and the overlap layout;
* ``aptsjax.data.minibatches``: one epoch's SAPTS minibatches;
* ``aptsjax.data.streams``: ``Stream``, H minibatches read one after the other by the local steps.
"""

from aptsjax.data.layout import REMAINDER_ACTIONS
from aptsjax.data.layout import as_overlap
from aptsjax.data.layout import check_batch
from aptsjax.data.layout import check_remainder
from aptsjax.data.layout import dropped_rows
from aptsjax.data.layout import full_batch_sizes
from aptsjax.data.layout import layout_sizes
from aptsjax.data.layout import overlap_layout
from aptsjax.data.layout import overlapping_subdomains
from aptsjax.data.layout import row_count
from aptsjax.data.layout import split_subdomains
from aptsjax.data.layout import take_rows
from aptsjax.data.layout import trim_rows
from aptsjax.data.minibatches import iterate_minibatches
from aptsjax.data.minibatches import minibatches
from aptsjax.data.minibatches import num_minibatches
from aptsjax.data.streams import Stream
from aptsjax.data.streams import minibatch
from aptsjax.data.streams import stream

__all__ = [
    "REMAINDER_ACTIONS", "Stream", "as_overlap", "check_batch", "check_remainder",
    "dropped_rows", "full_batch_sizes", "iterate_minibatches", "layout_sizes", "minibatch",
    "minibatches", "num_minibatches", "overlap_layout", "overlapping_subdomains", "row_count",
    "split_subdomains", "stream", "take_rows", "trim_rows",
]
