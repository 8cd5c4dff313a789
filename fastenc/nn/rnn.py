"""fastenc.nn.LSTM: torch.nn.LSTM (constructor, parameters, init, state_dict) on fastenc's fused LSTM layer."""

from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from fastenc import functional as F
from fastenc.nn._errors import NotScriptable


class LSTM(NotScriptable, torch.nn.LSTM):
    """Drop-in for `torch.nn.LSTM`; an instance of it too, so code that checks the type keeps working.

    Same forward: (T, B, I) input (or (B, T, I) with batch_first), unbatched (T, I), or a PackedSequence (sorted or
    not), with optional (h0, c0); returns (output, (h_n, c_n)). Each layer and direction is one call of
    `fastenc.functional.lstm_layer`: the input projection of all steps, then the fused recurrence.
    Dropout (torch's F.dropout, in training only) applies to every layer's output but the last, as torch does.
    """

    def flatten_parameters(self) -> None:
        """Accepted for compatibility; fastenc reads the parameters where they are, so there is nothing to pack."""

    def forward(self, input, hx: tuple[Tensor, Tensor] | None = None):
        packed = isinstance(input, PackedSequence)
        directions = 2 if self.bidirectional else 1
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        batch_sizes = sorted_indices = unsorted_indices = None
        batched = True
        if packed:
            input, batch_sizes, sorted_indices, unsorted_indices = input
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            batched = input.dim() == 3
            if not batched:
                input = input.unsqueeze(0 if self.batch_first else 1)
        batch = int(batch_sizes[0]) if packed else input.shape[0 if self.batch_first else 1]
        if hx is None:
            shape = (self.num_layers * directions, batch)
            hx = (input.new_zeros(*shape, out_size), input.new_zeros(*shape, self.hidden_size))
        elif not packed:
            rank = 3 if batched else 2
            if hx[0].dim() != rank or hx[1].dim() != rank:
                kind = "batched 3-D" if batched else "unbatched 2-D"
                raise RuntimeError(f"For {kind} input, hx and cx should also be {rank}-D but got "
                                   f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
            if not batched:
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        # torch's own checks, so a wrong input_size, hidden shape or dtype fails with torch's message.
        self._update_flat_weights()
        self.check_forward_args(input, hx, batch_sizes)
        hx = self.permute_hidden(hx, sorted_indices)  # a PackedSequence's rows are sorted by length
        if self.batch_first and not packed:
            input = input.transpose(0, 1)  # the layers run (T, B, I)

        h_n, c_n = [], []
        layer_input = input
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                weights = self._layer_weights(layer, direction)
                out, h, c = F.lstm_layer(layer_input, hx[0][index], hx[1][index], *weights,
                                         batch_sizes=batch_sizes, reverse=direction == 1)
                outputs.append(out)
                h_n.append(h)
                c_n.append(c)
            layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = TF.dropout(layer_input, self.dropout, training=True)
        output, hidden = layer_input, (torch.stack(h_n), torch.stack(c_n))

        if packed:
            return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), \
                self.permute_hidden(hidden, unsorted_indices)
        output = output.transpose(0, 1) if self.batch_first else output
        if not batched:
            return output.squeeze(0 if self.batch_first else 1), (hidden[0].squeeze(1), hidden[1].squeeze(1))
        return output, hidden

    def _layer_weights(self, layer: int, direction: int) -> tuple[Tensor | None, ...]:
        """(weight_ih, weight_hh, bias_ih, bias_hh, weight_hr) of one layer and direction, by torch's names."""
        suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        get = lambda name: getattr(self, name + suffix, None)  # noqa: E731
        bias = (get("bias_ih"), get("bias_hh")) if self.bias else (None, None)
        return get("weight_ih"), get("weight_hh"), *bias, get("weight_hr") if self.proj_size > 0 else None
