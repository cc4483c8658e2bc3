"""STLinear: a drop-in nn.Linear replacement computed by the Strassen-Tile operator.

Shapes: input (..., L, K) -> output (..., L, N). Rows are grouped along the sequence axis L in
blocks of ``row_tile`` consecutive positions *inside each sample*: rows of different samples never
share a tile (every leading index is its own matrix). A 2-D input (batch, K) has no sequence axis,
so it is rejected unless ``row_tile == 1`` (1 x t strip tiles never mix rows).

Learned parameters: the encoded weight ``w_hat`` (rank, ceil(K/t), ceil(N/t)), the activation
encoder ``enc_x`` (rank, row_tile*t), the decoder ``dec`` (row_tile*t, rank) and ``bias`` (N).
The weight encoder ``enc_w`` (rank, t*t) is kept as a buffer: it is what encodes a dense weight
(``from_linear``, calibration) and is not needed by the forward pass.

Non-finite inputs: a NaN or Inf anywhere in one input row makes *every* output row of its row tile
NaN (an Inf becomes NaN: encoders take differences), even with an exact algorithm, where nn.Linear
would only spoil that row. Rows of other tiles and of other samples are unaffected; with
``row_tile=1`` it stays in its own row. Check inputs with ``torch.isfinite`` if that matters.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._utils import ceil_div, check_int
from ..algorithms import BilinearAlgorithm, exact_algorithm, resolve
from ..functional import ops as _ops
from ..functional.stl import stl_apply, stl_encode_weight
from .padding import current_row_mask

__all__ = ["STLinear", "is_linear_like", "dense_weight_of"]


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and relatives): a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_linear_like(module: nn.Module) -> bool:
    """True for nn.Linear and for transformers' Conv1D (same map, weight stored transposed)."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def dense_weight_of(module: nn.Module) -> torch.Tensor:
    """The (out_features, in_features) weight of an nn.Linear or a transformers Conv1D (a view, not a copy)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if _is_conv1d(module):
        return module.weight.t()
    raise TypeError(f"expected an nn.Linear or transformers Conv1D, got {type(module).__name__}")


_LEAN_DTYPES = (torch.float32, torch.float64)


def _lean_operands(layer: "STLinear", x, training: bool = False):
    """(w_hat, enc_x, dec, bias) where forward may call the kernels directly, else None.

    That is where nothing forward and stl_apply check can fail: eager mode (no autocast, no row mask,
    nothing watching: see :func:`strassenkit.functional.ops.plain_eager`) on a non-empty 3-D CPU input of
    the layer's width, in the dtype of all its parameters (float32/float64), with the parameter shapes the
    layer was built with; grad mode off (inference), or with ``training`` on (then forward calls the
    autograd function with the bias directly). It saves ~10 us per inference call and ~20 us per training
    call of Python checks (tests compare the values and gradients with the checked path bit for bit).
    """
    if (type(x) is not torch.Tensor or torch.is_grad_enabled() != training or x.dim() != 3
            or x.shape[2] != layer.in_features):
        return None
    params = layer._parameters
    # .get: a parametrized parameter (torch.nn.utils.parametrize) lives elsewhere; then the checked path runs
    w_hat, enc_x, dec, bias = params.get("w_hat"), params.get("enc_x"), params.get("dec"), params.get("bias")
    if "bias" not in params and getattr(layer, "bias", None) is not None:
        return None
    dt = x.dtype
    if (dt not in _LEAN_DTYPES or w_hat is None or enc_x is None or dec is None or w_hat.dtype != dt
            or enc_x.dtype != dt or dec.dtype != dt or (bias is not None and bias.dtype != dt)):
        return None
    n, m, p = layer.row_tile, layer.tile, layer.tile
    r = enc_x.shape[0]
    if (w_hat.shape != (r, ceil_div(layer.in_features, m), ceil_div(layer.out_features, p)) or enc_x.shape != (r, n * m)
            or dec.shape != (n * p, r) or x.numel() == 0 or torch.is_autocast_enabled("cpu")):
        return None
    if n > 1 and current_row_mask() is not None:
        return None
    ops = (w_hat, enc_x, dec) if bias is None else (w_hat, enc_x, dec, bias)
    if not (w_hat.is_cpu and enc_x.is_cpu and dec.is_cpu and (bias is None or bias.is_cpu)) or not _ops.plain_eager(x, *ops):
        return None
    return w_hat, enc_x, dec, bias


class STLinear(nn.Module):
    """y = STL(x, w_hat) + bias with tile t, rank r.

    A NaN/Inf in one input row turns the whole row tile (``row_tile`` consecutive rows of that
    sample) into NaN, even with an exact algorithm (see the module docstring); ``row_tile=1`` keeps
    it in its row. Meta device: ``STLinear(..., device="meta")`` (or inside ``with torch.device("meta")``)
    builds the layer without values; ``to_empty(device=...)`` + ``load_state_dict`` fills it, as for nn.Linear.

    Args:
        in_features (K), out_features (N): as nn.Linear.
        tile: t, the weight tile is t x t; activation tiles are row_tile x t.
        rank: r, the number of encoded products (core cost r/(row_tile*t*t) of MatMul).
        init: a BilinearAlgorithm, a catalogue name (exact; rank must match), "random"
            (variance-preserving Gaussian), or an approximation family ("als", "truncate", ...).
        row_tile: rows per activation tile (default t). 1 never mixes rows.
        seed: seed of the init family (the dense weight that is encoded uses torch's RNG).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        tile: int = 4,
        rank: int = 24,
        init: str | BilinearAlgorithm = "random",
        row_tile: int | None = None,
        seed: int = 0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features), ("tile", tile), ("rank", rank)):
            check_int(name, v)
        check_int("row_tile", row_tile, allow_none=True)
        check_int("seed", seed, lo=0)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype (torch.float32, torch.float64, torch.bfloat16, "
                            f"...), got {dtype!r}")
        row_tile = tile if row_tile is None else row_tile
        self.in_features, self.out_features = in_features, out_features
        self.tile, self.row_tile, self.rank = tile, row_tile, rank
        with torch.device("cpu"):  # the init family computes on CPU even inside `with torch.device("meta")`
            alg = resolve(init, row_tile, tile, tile, rank, seed)
            mats = alg.stl_matrices()
        self.init_name = alg.name
        if device is None:  # like nn.Linear: honour a surrounding `with torch.device(...)` block
            device = torch.empty(0).device
        factory = {"device": device, "dtype": dtype or torch.get_default_dtype()}
        enc_x, enc_w, dec = (t.to(**factory) for t in mats)
        self.enc_x = nn.Parameter(enc_x)
        self.dec = nn.Parameter(dec)
        self.register_buffer("enc_w", enc_w)
        kt, nt = ceil_div(in_features, tile), ceil_div(out_features, tile)
        self.w_hat = nn.Parameter(torch.empty(rank, kt, nt, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    @property
    def format(self) -> tuple[int, int, int]:
        """Tile format <n,m,p> = <row_tile, tile, tile>."""
        return (self.row_tile, self.tile, self.tile)

    def reset_parameters(self) -> None:
        """Encode a dense weight initialized like nn.Linear's (kaiming-uniform, a=sqrt(5)).

        On the meta device there are no values to initialize (as for nn.Linear): nothing is done;
        ``to_empty(device=...)`` then ``load_state_dict`` (or this method) fills the layer.
        """
        if self.w_hat.is_meta:
            return
        dense = torch.empty(self.out_features, self.in_features, dtype=self.w_hat.dtype, device=self.w_hat.device)
        nn.init.kaiming_uniform_(dense, a=math.sqrt(5))
        self.load_dense_weight(dense)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @torch.no_grad()
    def load_dense_weight(self, weight: torch.Tensor) -> None:
        """Set w_hat = encode(weight.T) with enc_w; ``weight`` is (out_features, in_features) like nn.Linear's."""
        if weight.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"weight must have shape (out_features={self.out_features}, in_features={self.in_features}), "
                f"got {tuple(weight.shape)}"
            )
        if weight.device != self.w_hat.device and not self.w_hat.is_meta:
            raise ValueError(f"weight is on device {weight.device} but the layer is on {self.w_hat.device}; "
                             f"move one of them with .to(device)")
        if not weight.is_meta and not torch.isfinite(weight).all():
            raise ValueError("weight contains NaN or infinite values; fix the source layer before converting it")
        if self.w_hat.is_meta:  # no values to encode
            return
        w_hat = stl_encode_weight(weight.T.to(self.enc_w.dtype), self.enc_w, self.format)
        self.w_hat.copy_(w_hat)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        init: str | BilinearAlgorithm = "strassen_x_strassen",
        tile: int | None = None,
        rank: int | None = None,
        row_tile: int | None = None,
        seed: int = 0,
    ) -> "STLinear":
        """Encode a dense nn.Linear (or transformers' GPT-2 style ``Conv1D``, weight (in, out)).

        With an exact algorithm the output equals the dense layer's.

        ``tile``/``rank``/``row_tile`` default to the algorithm's format when ``init`` is a
        BilinearAlgorithm or catalogue name; they are required for families such as "random".
        """
        if not is_linear_like(linear):
            raise TypeError(f"from_linear expects an nn.Linear or transformers Conv1D, got {type(linear).__name__}")
        weight = dense_weight_of(linear)
        if not weight.is_meta and (not torch.isfinite(weight).all()
                                          or (linear.bias is not None and not torch.isfinite(linear.bias).all())):
            raise ValueError("linear has NaN or infinite weights or bias; cannot convert a broken layer")
        alg = exact_algorithm(init)  # None for a family such as "random"
        if alg is not None:
            if alg.m != alg.p:
                raise ValueError(f"STLinear needs square weight tiles (m == p), got algorithm format {alg.format}")
            tile, rank, row_tile = tile or alg.m, rank or alg.rank, row_tile or alg.n
        if tile is None or rank is None:
            raise ValueError(f"init={init!r} is a family: pass tile= and rank= explicitly")
        w = weight
        layer = cls(
            w.shape[1], w.shape[0], bias=linear.bias is not None, tile=tile, rank=rank,
            init=init if alg is None else alg, row_tile=row_tile, seed=seed, device=w.device, dtype=w.dtype,
        )
        layer.load_dense_weight(w.detach())
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lean = _lean_operands(self, x, torch.is_grad_enabled())
        if lean is not None:  # eager: straight to the kernels / the autograd function (see _lean_operands)
            if torch.is_grad_enabled():
                return _ops.stl_train_eager(x, *lean[:3], self.row_tile, self.tile, self.tile, self.out_features,
                                            lean[3])
            return _ops.stl_infer(x, *lean[:3], self.row_tile, self.tile, self.tile, self.out_features, lean[3])
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"STLinear expects a torch.Tensor input (..., {self.in_features}), got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"STLinear expected input (..., {self.in_features}), got shape {tuple(x.shape)}")
        if x.dim() < 3 and self.row_tile > 1:
            raise ValueError(
                f"STLinear(row_tile={self.row_tile}) got a {x.dim()}-D input {tuple(x.shape)} without a sequence "
                f"axis: tiles would mix rows of different samples. Pass (batch, seq, features), or build the layer "
                f"with row_tile=1 (1 x t strips, which never mix rows)"
            )
        w_hat, enc_x, dec, bias = self.w_hat, self.enc_x, self.dec, self.bias
        dev = x.device
        if w_hat.device != dev or enc_x.device != dev or dec.device != dev or (bias is not None and bias.device != dev):
            for name, t in (("w_hat", w_hat), ("enc_x", enc_x), ("dec", dec), ("bias", bias)):
                if t is not None and t.device != dev:
                    hint = (" (a meta tensor has no values: the layer was built on the meta device, or loaded with "
                            "load_state_dict(assign=True) without this key; call .to_empty(device=...) and load its "
                            "weights)" if t.is_meta else f"; move the layer with .to({str(dev)!r}) or the input")
                    raise ValueError(f"STLinear.{name} is on device {t.device} but the input x is on {dev}{hint}")
        if self.row_tile > 1:
            mask = current_row_mask()
            if mask is not None:  # padding rows must not share a tile with real rows (see nn.padding)
                x = mask.apply(x, f"STLinear({self.in_features}, {self.out_features}, row_tile={self.row_tile})")
        squeeze = x.dim() == 1
        if squeeze:
            x = x.unsqueeze(0)
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)  # y is in x's dtype
        y = stl_apply(x, w_hat, enc_x, dec, self.format, out_features=self.out_features, bias=bias)
        return y.squeeze(0) if squeeze else y

    # ---------------------------------------------------------------- the dense layer it replaced
    def keep_original(self, module: nn.Module) -> None:
        """Keep the dense layer this one replaced (for :meth:`to_original` and calibration).

        It is held outside the module tree (not in ``state_dict``, not moved by ``.to()``, not a
        parameter), so it costs memory but nothing else; ``STLConfig(keep_dense_weight=False)`` skips it.
        """
        if not is_linear_like(module):
            raise TypeError(f"keep_original expects an nn.Linear or transformers Conv1D, got {type(module).__name__}")
        self.__dict__["_original"] = module

    @property
    def original(self) -> nn.Module | None:
        """The dense layer this one replaced, if it was kept (see :meth:`keep_original`)."""
        return self.__dict__.get("_original")

    @property
    def dense_weight(self) -> torch.Tensor | None:
        """(out_features, in_features) weight of the replaced dense layer, or None if it was not kept."""
        orig = self.original
        return None if orig is None else dense_weight_of(orig).detach()

    def to_original(self) -> nn.Module:
        """The dense layer this one replaced, exactly as it was (moved to this layer's device and dtype)."""
        orig = self.original
        if orig is None:
            raise ValueError(
                "this STLinear does not hold the dense layer it replaced (converted with keep_dense_weight=False, "
                "or loaded from disk); use to_dense() for row_tile=1 layers, or reconvert from the dense model"
            )
        return orig.to(device=self.w_hat.device, dtype=self.w_hat.dtype)

    @property
    def has_dense_equivalent(self) -> bool:
        """True when the layer is a per-row linear map (``row_tile == 1``), so :meth:`to_dense` exists."""
        return self.row_tile == 1

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """The nn.Linear with the same outputs (``row_tile == 1`` only; a taller tile mixes rows).

        The weight is read off by applying the layer to the identity in float64.
        """
        if not self.has_dense_equivalent:
            raise ValueError(
                f"STLinear(row_tile={self.row_tile}) has no dense equivalent: each output row depends on the "
                f"{self.row_tile} rows of its tile. Only row_tile=1 layers fold back into nn.Linear"
            )
        w = self.w_hat
        eye = torch.eye(self.in_features, dtype=torch.float64, device=w.device).unsqueeze(0)
        cols = stl_apply(eye, w.double(), self.enc_x.double(), self.dec.double(), self.format,
                         out_features=self.out_features)[0]
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        lin.weight.copy_(cols.T.to(w.dtype))
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    @property
    def flop_factor(self) -> float:
        """Core MatMul FLOPs / STL core FLOPs = row_tile * t^2 / r."""
        return self.row_tile * self.tile * self.tile / self.rank

    @property
    def param_factor(self) -> float:
        """Encoded weight size / dense weight size = r / t^2."""
        return self.rank / (self.tile * self.tile)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"tile={self.tile}, row_tile={self.row_tile}, rank={self.rank}, init={self.init_name!r}, "
            f"flop_factor={self.flop_factor:.2f}x, param_factor={self.param_factor:.2f}x"
        )
