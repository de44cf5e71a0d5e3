"""The seeds' recurrent classifiers in PyTorch: Elman RNN, GRU, LSTM, LSTM with peepholes,
LSTM with coupled input-forget gate (CIFG); stacked; uni- or bidirectional; token or frame input;
a classification head after every step.

Every layer keeps its weights in PyTorch's own `nn.RNN` / `nn.GRU` / `nn.LSTM` layout (gate
order i, f, g, o for the LSTM; r, z, n for the GRU). Plain cells run on PyTorch's fused kernels;
peephole and CIFG cells run an explicit time loop with the same weights. The forward of
`RecurrentClassifier.contract_forward` is the v1 serving contract:
(x, lengths, state[B, S, H]) -> (step_probs[B, T, C], probs[B, C], state_out[B, S, H]).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from export.arch import ArchConfig

_RNN_MODULES: dict[str, type[nn.RNNBase]] = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


class RecurrentLayer(nn.Module):
    """One (possibly bidirectional) recurrent layer that honours per-row lengths."""

    def __init__(self, arch: ArchConfig, input_size: int) -> None:
        super().__init__()
        self.arch = arch
        h = arch.hidden_size
        kwargs = {"nonlinearity": "tanh"} if arch.cell == "rnn" else {}
        self.rnn = _RNN_MODULES[arch.cell](
            input_size,
            h,
            num_layers=1,
            batch_first=True,
            bidirectional=arch.bidirectional,
            **kwargs,
        )
        if arch.peephole:
            # Per direction: peephole weights for the i, f, o gates, [3H] each.
            self.peephole = nn.Parameter(torch.zeros(arch.directions, 3 * h))
        self._init_gate_biases()

    def _init_gate_biases(self) -> None:
        """Forget-gate bias (LSTM), keep-gate bias (GRU z); for CIFG the input gate gets
        -forget_bias so that f = 1 - i starts at sigmoid(forget_bias)."""
        h, fb = self.arch.hidden_size, self.arch.forget_bias
        with torch.no_grad():
            for d in range(self.arch.directions):
                sfx = "_reverse" if d else ""
                b_ih = getattr(self.rnn, f"bias_ih_l0{sfx}")
                b_hh = getattr(self.rnn, f"bias_hh_l0{sfx}")
                if self.arch.cell == "lstm" and self.arch.cifg:
                    b_ih[0:h].fill_(-fb)
                    b_hh[0:h].zero_()
                    b_ih[h : 2 * h].zero_()  # the forget block is unused under CIFG
                    b_hh[h : 2 * h].zero_()
                elif self.arch.cell == "lstm" or self.arch.cell == "gru":
                    b_ih[h : 2 * h].fill_(fb)
                    b_hh[h : 2 * h].zero_()

    def direction_params(self, d: int) -> dict[str, torch.Tensor]:
        sfx = "_reverse" if d else ""
        out = {
            "w_ih": getattr(self.rnn, f"weight_ih_l0{sfx}"),
            "w_hh": getattr(self.rnn, f"weight_hh_l0{sfx}"),
            "b_ih": getattr(self.rnn, f"bias_ih_l0{sfx}"),
            "b_hh": getattr(self.rnn, f"bias_hh_l0{sfx}"),
        }
        if self.arch.peephole:
            out["peephole"] = self.peephole[d]
        return out

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x (B, T, I), lengths (B,), h0/c0 (D, B, H) -> y (B, T, D*H), h_n (D, B, H), c_n."""
        if self.arch.peephole or self.arch.cifg:
            return self._forward_loop(x, lengths, h0, c0)
        t = x.shape[1]
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        hx = (h0, c0) if self.arch.cell == "lstm" else h0
        out, hn = self.rnn(packed, hx)
        y, _ = pad_packed_sequence(out, batch_first=True, total_length=t)
        if self.arch.cell == "lstm":
            return y, hn[0], hn[1]
        return y, hn, None

    def _forward_loop(
        self, x: torch.Tensor, lengths: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        assert c0 is not None
        ys, hs, cs = [], [], []
        for d in range(self.arch.directions):
            y, h, c = self._run_direction(x, lengths, h0[d], c0[d], d)
            ys.append(y)
            hs.append(h)
            cs.append(c)
        return torch.cat(ys, dim=-1), torch.stack(hs), torch.stack(cs)

    def _run_direction(
        self, x: torch.Tensor, lengths: torch.Tensor, h: torch.Tensor, c: torch.Tensor, d: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """An explicit LSTM loop with peepholes and/or CIFG; rows stop at their own length."""
        p = self.direction_params(d)
        hid = self.arch.hidden_size
        bsz, t_max, _ = x.shape
        xw = torch.matmul(x, p["w_ih"].t()) + p["b_ih"]  # (B, T, 4H)
        if self.arch.peephole:
            p_i, p_f, p_o = p["peephole"].split(hid)
        outputs = [x.new_zeros(bsz, hid)] * t_max
        steps = range(t_max - 1, -1, -1) if d else range(t_max)
        for t in steps:
            gates = xw[:, t] + torch.matmul(h, p["w_hh"].t()) + p["b_hh"]  # (B, 4H)
            g_i, g_f, g_g, g_o = gates.split(hid, dim=1)
            if self.arch.peephole:
                g_i = g_i + p_i * c
                g_f = g_f + p_f * c
            i = torch.sigmoid(g_i)
            f = 1.0 - i if self.arch.cifg else torch.sigmoid(g_f)
            c_new = f * c + i * torch.tanh(g_g)
            if self.arch.peephole:
                g_o = g_o + p_o * c_new
            h_new = torch.sigmoid(g_o) * torch.tanh(c_new)
            valid = (t < lengths).unsqueeze(1)  # (B, 1)
            h = torch.where(valid, h_new, h)
            c = torch.where(valid, c_new, c)
            outputs[t] = torch.where(valid, h_new, torch.zeros_like(h_new))
        return torch.stack(outputs, dim=1), h, c


class RecurrentClassifier(nn.Module):
    """Input layer -> stacked recurrent layers -> per-step linear head."""

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.arch = arch
        if arch.input_kind == "tokens":
            self.embedding = nn.Embedding(arch.vocab_size, arch.embedding_dim)
        else:
            # Normalisation lives in the model (and so in the graph): raw frames in.
            self.register_buffer("feature_mean", torch.zeros(arch.feature_dim))
            self.register_buffer("feature_std", torch.ones(arch.feature_dim))
        sizes = [arch.input_size] + [arch.hidden_size * arch.directions] * (arch.num_layers - 1)
        self.layers = nn.ModuleList(RecurrentLayer(arch, size) for size in sizes)
        self.dropout = nn.Dropout(arch.dropout)
        self.head = nn.Linear(arch.hidden_size * arch.directions, arch.num_classes)

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp_min(1e-6))

    def zero_state(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, self.arch.state_rows, self.arch.hidden_size)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.arch.input_kind == "tokens":
            return self.embedding(x)  # (B, T, E)
        return (x - self.feature_mean) / self.feature_std  # (B, T, F)

    def step_logits(
        self, x: torch.Tensor, lengths: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T[, F]), lengths (B,), state (B, S, H) -> logits (B, T, C), state_out (B, S, H)."""
        arch = self.arch
        if state is None:
            state = self.zero_state(x.shape[0]).to(x.device)
        st = state.transpose(0, 1)  # (S, B, H)
        out_rows: list[torch.Tensor | None] = [None] * arch.state_rows
        y = self.embed(x)
        for index, layer in enumerate(self.layers):
            if index:
                y = self.dropout(y)
            h_lo, h_hi = arch.state_slice(index, "h")
            c0 = None
            if arch.cell == "lstm":
                c_lo, c_hi = arch.state_slice(index, "c")
                c0 = st[c_lo:c_hi].contiguous()
            y, hn, cn = layer(y, lengths, st[h_lo:h_hi].contiguous(), c0)
            out_rows[h_lo:h_hi] = list(hn)
            if cn is not None:
                out_rows[c_lo:c_hi] = list(cn)
        logits = self.head(self.dropout(y))  # (B, T, C)
        state_out = torch.stack(out_rows, dim=1)  # type: ignore[arg-type]  # (B, S, H)
        return logits, state_out

    def contract_forward(
        self, x: torch.Tensor, lengths: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The v1 contract: (x, lengths, state) -> (step_probs, probs, state_out)."""
        logits, state_out = self.step_logits(x, lengths, state)
        step_probs = torch.softmax(logits, dim=-1)  # (B, T, C)
        last = (lengths - 1).view(-1, 1, 1).expand(-1, 1, step_probs.shape[-1])
        probs = step_probs.gather(1, last).squeeze(1)  # (B, C)
        return step_probs, probs, state_out
