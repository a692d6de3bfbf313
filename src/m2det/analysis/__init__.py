"""The paper's analyses as tools: Fig. 6's activation maps per scale and level (`explain`)."""

from m2det.analysis.activations import Explanation, MapPeak, explain, reduce_levels

__all__ = ["Explanation", "MapPeak", "explain", "reduce_levels"]
