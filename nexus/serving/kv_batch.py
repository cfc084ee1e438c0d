"""The state of the rows a transformers model decodes together, for continuous batching.

Rows join between decoding steps (their prompts are prefilled on their own,
then their KV caches are left-padded and stacked onto the running ones) and
leave as soon as they finish, so a request arriving mid-generation does not
wait for the whole running batch to end. Padding is masked out and every row
keeps its own position ids, so a row's tokens are the same whatever it is
batched with.

Merging needs plain growing caches (`DynamicLayer`); models with sliding or
linear-attention layers keep their caches unmerged, and their rows join only
when the batch is empty.
"""

from __future__ import annotations


def _left_pad(tensor, length: int, dim: int):
    import torch

    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def mergeable(cache) -> bool:
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", ()))


class RunningBatch:
    """KV cache [rows, heads, length, dim] per layer, attention mask [rows, length], next positions [rows, 1]."""

    def __init__(self) -> None:
        self.cache = None
        self.mask = None
        self.positions = None

    @property
    def size(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[0])

    def add(self, cache, mask, positions) -> None:
        """Stack freshly prefilled rows under the running ones."""
        if self.size == 0:
            self.cache, self.mask, self.positions = cache, mask, positions
            return
        import torch

        length = max(self.mask.shape[1], mask.shape[1])
        for running, joining in zip(self.cache.layers, cache.layers):
            running.keys = torch.cat([_left_pad(running.keys, length, 2), _left_pad(joining.keys, length, 2)])
            running.values = torch.cat([_left_pad(running.values, length, 2), _left_pad(joining.values, length, 2)])
        self.mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(mask, length, 1)])
        self.positions = torch.cat([self.positions, positions])

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order); drop columns no remaining row attends to."""
        if not rows:
            self.cache = self.mask = self.positions = None
            return
        import torch

        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.mask, self.positions = self.mask[index], self.positions[index]
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index][:, :, start:]
            layer.values = layer.values[index][:, :, start:]

    def next_step(self):
        """Mask and positions for one more token per row."""
        import torch

        self.mask = torch.cat([self.mask, self.mask.new_ones((self.size, 1))], dim=-1)
        self.positions = self.positions + 1
        return self.mask, self.positions
