"""``python -m sasa_jax.models``: every model's parameters and FLOPs beside Table 1."""

from sasa_jax import models
from sasa_jax.models.flops import human


def _relative(ours: float, paper: float) -> str:
  return f"{100 * (ours / paper - 1):+.1f}%"


def table() -> str:
  """A Markdown table: each model at its data set's resolution, paper columns for
  the ImageNet models (FLOPs = 2 x multiply-adds)."""
  header = ("| model | input | params | FLOPs | paper params | paper FLOPs | "
            "paper top-1 |")
  rows = [header, "|" + "---|" * 7]
  for name in models.list_models():
    config = models.get_config(name)
    ours = models.describe(name)
    cells = [name, f"{config.image_size}x{config.image_size}x{config.in_channels}",
             human(ours["params"]), human(ours["flops"])]
    paper = config.paper
    if paper is None:
      cells += ["", "", ""]
    else:
      cells += [f"{paper.params_m}M ({_relative(ours['params'], paper.params_m * 1e6)})",
                f"{paper.gflops}G ({_relative(ours['flops'], paper.gflops * 1e9)})",
                f"{paper.top1}"]
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows)


if __name__ == "__main__":
  print(table())
