"""Statistics of a model over a corpus, for edit methods to solve with.

`collect`: key second moments and diagonal Fisher of the edited layers (the kernels'
callers); `per_sample`: exact per-sample Fisher of any module; `distributed` and `resume`:
the same sums across torchrun ranks and across crashes; `job`: `patcher stats` as a
library call. The collection API is re-exported here.
"""

from patcher.stats.collect import (
    FisherDiagonals,
    SecondMoments,
    collect_fisher,
    collect_second_moments,
    corpus_batches,
    read_corpus,
    stats_cache_key,
)

__all__ = [
    "FisherDiagonals",
    "SecondMoments",
    "collect_fisher",
    "collect_second_moments",
    "corpus_batches",
    "read_corpus",
    "stats_cache_key",
]
