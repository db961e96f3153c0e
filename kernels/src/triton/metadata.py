"""Launch metadata of the kernels: profiler traces name each launch with its shape, FLOPs and bytes.

Triton calls ``launch_metadata(grid, kernel, args)`` when a profiler hook is active (never
otherwise); ``args`` maps the kernel's parameter names to the launch's values. Bytes count
each operand once (the minimum traffic), FLOPs count multiply-adds as two.
"""
from __future__ import annotations


def _size(args: dict, name: str) -> int:
    tensor = args.get(name)
    return tensor.element_size() if hasattr(tensor, "element_size") else 4


def _flops_key(args: dict, name: str) -> str:
    return f"flops{8 * _size(args, name)}"


def fused_linear(grid, kernel, args: dict) -> dict:
    m, n, k, r = args["M"], args["N"], args["K"], args["R"] if args["HAS_LOWRANK"] else 0
    elem = _size(args, "out_ptr")
    moved = elem * (m * k + k * n + m * n) + 4 * m * r + elem * r * n
    return {"name": f"fastlora.fused_linear M={m} N={n} K={k} r={r}",
            _flops_key(args, "out_ptr"): 2 * m * n * (k + r), "bytes": moved}


def shrink(grid, kernel, args: dict) -> dict:
    m, k, r = args["M"], args["K"], args["R"]
    elem = _size(args, "x_ptr")
    return {"name": f"fastlora.shrink M={m} K={k} r={r}", _flops_key(args, "x_ptr"): 2 * m * k * r,
            "bytes": elem * (m * k + r * k) + 4 * m * r}


def dy_columns(grid, kernel, args: dict) -> dict:
    m, d, r = args["M"], args["D"], args["R"]
    elem = _size(args, "dy_ptr")
    products = (args["COMPUTE_DP"] + args["COMPUTE_DB"]) * 2 * m * d * r
    return {"name": f"fastlora.dy_pass M={m} D={d} r={r}", _flops_key(args, "dy_ptr"): products,
            "bytes": elem * (m * d + d * r) + 4 * m * r * (args["COMPUTE_DP"] + args["COMPUTE_DB"])}


def down_grad(grid, kernel, args: dict) -> dict:
    m, k, r = args["M"], args["K"], args["R"]
    elem = _size(args, "x_ptr")
    return {"name": f"fastlora.down_grad M={m} K={k} r={r}", _flops_key(args, "x_ptr"): 2 * m * k * r,
            "bytes": elem * m * k + 4 * m * r + 4 * r * k}


def neat_projection(grid, kernel, args: dict) -> dict:
    d_out, d_in, r = args["D_OUT"], args["D_IN"], args["R"]
    elem = _size(args, "w_ptr")
    return {"name": f"fastlora.neat D_OUT={d_out} D_IN={d_in} r={r}", _flops_key(args, "w_ptr"): 2 * d_out * d_in * r,
            "bytes": elem * (d_out * d_in + 2 * d_in * r + d_out * r)}


def onepass_forward(grid, kernel, args: dict) -> dict:
    m, n, k, r = args["M"], args["N"], args["K"], args["R"]
    elem = _size(args, "out_ptr")
    moved = elem * (m * k + k * n + m * n + r * (k + n)) + 4 * m * r
    return {"name": f"fastlora.onepass_forward M={m} N={n} K={k} r={r}",
            _flops_key(args, "out_ptr"): 2 * m * n * (k + r) + 2 * m * k * r, "bytes": moved}


def onepass_input_grad(grid, kernel, args: dict) -> dict:
    m, n, k, r = args["M"], args["N"], args["K"], args["R"]
    elem = _size(args, "out_ptr")
    column_sums = 4 * -(-m // args["BLOCK_M"]) * k * (r * args["COMPUTE_DB"] + args["COMPUTE_DBIAS"])
    moved = elem * (m * k + k * n + m * n + r * (k + n)) + 4 * m * r * (1 + args["COMPUTE_DB"]) + column_sums
    flops = 2 * m * n * (k + r) + 2 * m * k * r * (1 + args["COMPUTE_DB"])
    return {"name": f"fastlora.onepass_input_grad M={m} N={n} K={k} r={r}", _flops_key(args, "out_ptr"): flops,
            "bytes": moved}
