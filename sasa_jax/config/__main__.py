"""``python -m sasa_jax.config``: every config key with its default, scope and allowed
values, as a Markdown table."""

from sasa_jax.config import keys


def table() -> str:
  rows = ["| key | default | scope | allowed | what |", "|---|---|---|---|---|"]
  for key in keys.KEYS:
    default = keys.default_value(key.name)
    shown = "(model's)" if key.name == "model_overrides" else f"`{default!r}`"
    cells = [f"`{key.name}`", shown, key.scope.value, key.allowed.description, key.doc]
    rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
  return "\n".join(rows)


if __name__ == "__main__":
  print(table())
