"""Vectorised example packing: rows 2i and 2i+1 of a right-padded batch become one sequence (paper Sec. 3.4)."""

import torch


def pack_pairs(ids: torch.Tensor, lengths: torch.Tensor, pad_id: int, drop_in_second: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate row pairs without Python loops over tokens.

    Args:
        ids: ``(N, T)`` right-padded token ids; ``lengths``: ``(N,)`` valid tokens per row.
        drop_in_second: column removed from the second row of each pair before joining (its BOS).
    Returns:
        ``(ceil(N/2), T')`` packed ids (right-padded with ``pad_id``) and their ``(ceil(N/2),)`` lengths. An odd last
        row is kept alone.
    """
    n, width = ids.shape
    if n % 2:  # pair the odd row with an empty one
        ids = torch.cat([ids, ids.new_full((1, width), pad_id)])
        lengths = torch.cat([lengths, lengths.new_zeros(1)])
    first, second = ids[0::2], ids[1::2]
    len_first, len_second = lengths[0::2], lengths[1::2]
    if drop_in_second is not None:
        keep = torch.ones(width, dtype=torch.bool, device=ids.device)
        keep[drop_in_second] = False
        second = torch.cat([second[:, keep], second.new_full((second.shape[0], 1), pad_id)], dim=1)
        len_second = len_second - (len_second > drop_in_second).long()
    packed_len = len_first + len_second
    pos = torch.arange(int(packed_len.max()), device=ids.device)[None]  # (1, T')
    from_first = pos < len_first[:, None]
    offset = pos - len_first[:, None]
    from_second = (~from_first) & (offset < len_second[:, None])
    take_first = first.gather(1, pos.clamp(max=width - 1).expand(first.shape[0], -1))
    take_second = second.gather(1, offset.clamp(0, width - 1))
    packed = torch.where(from_first, take_first, torch.where(from_second, take_second, pad_id))
    return packed, packed_len
