"""Training: config checks, the step functions, and end-to-end runs of the real
``train_and_evaluate`` / ``evaluate`` (in process and through ``train.py``)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sasa_jax import training
from sasa_jax.config import checks as config_validation
from sasa_jax.distributed import mesh
from sasa_jax.errors import ConfigError, NonFiniteLossError, WorkdirError
from sasa_jax.training import loop, optimizers, reporting, run_plan
from sasa_jax.workdir.checkpointer import Checkpointer

# ---------------------------------------------------------------------------
# Bad configs and workdirs: clear errors before anything is compiled.


def test_configs_are_locked_and_typed(make_config):
  config = make_config()
  with pytest.raises(AttributeError, match='Did you mean "batch_size"'):
    config.bach_size = 3
  with pytest.raises(AttributeError, match='Did you mean "kernel_size"'):
    config.model_overrides.kernal_size = 3
  with pytest.raises(TypeError, match="batch_size"):
    config.batch_size = "many"
  config.data_dir = "/data"  # A placeholder(str): unset (None) until given a string.
  config.num_train_steps = None
  assert (config.data_dir, config.num_train_steps) == ("/data", None)


def test_missing_and_bad_values(make_config):
  import ml_collections  # pylint: disable=g-import-not-at-top

  loose = ml_collections.ConfigDict(make_config().to_dict())  # e.g. an old config.json
  del loose["momentum"]
  loose.base_learning_rate = -1.0
  loose.eval_every_steps = 0
  with pytest.raises(ConfigError) as err:
    config_validation.validate_config(loose)
  message = str(err.value)
  assert "missing config key 'momentum'" in message
  assert "config.base_learning_rate=-1.0 is invalid: allowed a float > 0" in message
  assert ("config.eval_every_steps=0 is invalid: allowed None (from eval_every_epochs) "
          "or a positive int") in message
  with pytest.raises(ConfigError, match="config.optimizer='adam'.*'sgd'.*'adamw'"):
    config_validation.validate_config(make_config(optimizer="adam"))
  with pytest.raises(ConfigError, match="num_epochs=0 with config.num_train_steps unset"):
    config_validation.validate_config(make_config(num_epochs=0.0, num_train_steps=None))


def test_batch_not_divisible_by_devices():
  mesh.check_batch_size("batch_size", 16, 8, "devices")
  with pytest.raises(ConfigError) as error:
    mesh.check_batch_size("batch_size", 12, 8, "devices")
  for fact in ("config.batch_size=12", "devices", "multiple of 8", "8 or 16"):
    assert fact in str(error.value)


def test_unknown_model_fails_before_training(make_config, tmp_path):
  with pytest.raises(ConfigError, match="Unknown model name 'sasa_tinny'"):
    training.train_and_evaluate(make_config(model="sasa_tinny"), str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_workdir_holding_something_else(make_config, tmp_path):
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(WorkdirError, match="holds no sasa_jax run.*notes.txt"):
    training.train_and_evaluate(make_config(), str(tmp_path))


def test_workdir_of_another_experiment(make_config, tmp_path):
  saved = make_config(model="resnet_tiny")  # A checkpoint of another run, no config.json.
  with Checkpointer(str(tmp_path), async_checkpointing=False) as ckpt:
    # Its config is read first: the state (a stand-in here) is never reached.
    ckpt.save(2, {"w": jnp.zeros(3)}, training.data_position(2, saved), saved)
  loop.resume_check(make_config(model="resnet_tiny", num_train_steps=9))(
      config_validation.config_to_dict(saved), "the checkpoint")  # Loop settings may change.
  with pytest.raises(WorkdirError) as err:
    training.train_and_evaluate(make_config(base_learning_rate=0.5), str(tmp_path))
  message = str(err.value)
  assert "the checkpoint of step 2" in message
  assert re.search(r"model: 'resnet_tiny' .*'sasa_tiny'", message)
  assert re.search(r"base_learning_rate: 0.4 .*0.5", message)
  assert "num_train_steps" not in message  # Loop settings may change on resume.


# ---------------------------------------------------------------------------
# Pieces of the step.


def _schedule(config, num_train_examples=1437):
  plan = run_plan.create_run_plan(config, num_train_examples)
  return optimizers.create_learning_rate_schedule(config, plan)


def test_run_plan_follows_epochs_and_batch(make_config):
  config = make_config(num_train_steps=None, num_epochs=10.0, warmup_steps=None,
                       warmup_epochs=2.0, eval_every_steps=None, eval_every_epochs=4.0,
                       checkpoint_every_steps=None, checkpoint_every_epochs=2.5,
                       base_learning_rate=0.4, batch_size=100)
  plan = run_plan.create_run_plan(config, num_train_examples=1050)
  assert (plan.num_train_steps, plan.warmup_steps) == (105, 21)  # 10.5 steps per epoch.
  assert (plan.eval_every_steps, plan.checkpoint_every_steps) == (42, 26)
  assert plan.learning_rate == pytest.approx(0.4 * 100 / 256)
  config.num_train_steps, config.warmup_steps = 7, 3  # Set: they override the epochs.
  plan = run_plan.create_run_plan(config, num_train_examples=1050)
  assert (plan.num_train_steps, plan.warmup_steps) == (7, 3)
  assert "7 steps (0.6667 epochs of 1050 examples at batch 100)" in plan.describe()


def test_learning_rate_schedule(make_config):
  # Peak 1.6 at batch 4096 from 0.1 per 256 images; 10 warm-up steps then cosine to 0.
  schedule = _schedule(make_config(base_learning_rate=0.1, batch_size=4096,
                                   warmup_steps=10, num_train_steps=110))
  values = [float(schedule(s)) for s in (0, 5, 10, 60, 110)]
  np.testing.assert_allclose(values, [0.0, 0.8, 1.6, 0.8, 0.0], atol=1e-6)
  constant = _schedule(make_config(base_learning_rate=0.3, batch_size=256, warmup_steps=0,
                                   lr_schedule="constant"))
  assert float(constant(0)) == float(constant(1000)) == pytest.approx(0.3)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_weight_decay_skips_batchnorm_and_biases(make_config, optimizer):
  config = make_config(optimizer=optimizer, weight_decay=0.1, base_learning_rate=1.0,
                       warmup_steps=0, lr_schedule="constant", momentum=0.0)
  tx = optimizers.create_optimizer(config, _schedule(config))
  params = {"conv": {"kernel": jnp.ones((3, 3, 2, 2))},
            "bn": {"scale": jnp.ones((2,)), "bias": jnp.ones((2,))}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert float(jnp.abs(updates["conv"]["kernel"]).min()) > 0
  assert float(jnp.abs(updates["bn"]["scale"]).max()) == 0
  assert float(jnp.abs(updates["bn"]["bias"]).max()) == 0


def test_gradient_clipping(make_config):
  config = make_config(grad_clip_norm=1.0, weight_decay=0.0, base_learning_rate=1.0,
                       base_batch_size=16, warmup_steps=0, lr_schedule="constant",
                       momentum=0.0)  # Learning rate 1.0 at batch 16.
  tx = optimizers.create_optimizer(config, _schedule(config))
  params = {"w": jnp.zeros((4,))}
  updates, _ = tx.update({"w": jnp.full((4,), 10.0)}, tx.init(params), params)
  assert float(optax.global_norm(updates)) == pytest.approx(1.0, rel=1e-5)


def test_loss_and_ema_helpers():
  logits = jnp.array([[10.0, 0.0, 0.0]])
  plain = training.cross_entropy_loss(logits, jnp.array([0]), 3)
  smooth = training.cross_entropy_loss(logits, jnp.array([0]), 3, 0.1)
  assert float(plain[0]) < 1e-3 < float(smooth[0])
  decay = lambda step, warmup: float(training.ema_decay_at(jnp.array(step), 0.9999, warmup))
  assert decay(0, True) == pytest.approx(0.1)
  assert decay(10**6, True) == pytest.approx(0.9999)
  assert decay(0, False) == decay(10**6, False) == pytest.approx(0.9999)


def test_non_finite_loss_names_the_step():
  ok = {"finite": jnp.array(True), "loss": jnp.array(1.0), "grad_norm": jnp.array(1.0)}
  bad = {"finite": jnp.array(False), "loss": jnp.array(jnp.nan),
         "grad_norm": jnp.array(jnp.inf)}
  reporting.check_finite([(7, ok)])
  with pytest.raises(NonFiniteLossError, match="at step 8 .*no checkpoint"):
    reporting.check_finite([(7, ok), (8, bad), (9, bad)])


# ---------------------------------------------------------------------------
# End to end, in process.


def _params(workdir: str, config, step: int):
  setup = training.Experiment(config, workdir)
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    return jax.device_get(ckpt.restore_state(step, setup.abstract_state()))
  finally:
    ckpt.close()


@pytest.mark.slow
def test_train_resume_evaluate_in_process(make_config, tmp_path):
  """A 6-step run; the same run resumed from its step-4 checkpoint ends with the
  same parameters; re-running a finished run only evaluates; evaluate() writes
  evaluation.json for the latest or a chosen checkpoint."""
  config = make_config(num_train_steps=6)
  straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")
  straight = training.train_and_evaluate(config, straight_dir)
  assert straight["step"] == 6 and straight["start_step"] == 0
  ckpt_dir = os.path.join(straight_dir, "checkpoints")
  assert sorted(os.listdir(ckpt_dir), key=int) == ["2", "4", "6"]
  assert os.listdir(os.path.join(straight_dir, "tensorboard"))
  with open(os.path.join(straight_dir, "config.json")) as f:
    assert json.load(f)["num_train_steps"] == 6
  assert np.isfinite(straight["train"]["train/loss"])
  assert straight["eval"]["num_examples"] == 360

  # As if the run had been killed after saving step 4.
  shutil.copytree(straight_dir, resumed_dir)
  shutil.rmtree(os.path.join(resumed_dir, "checkpoints", "6"))
  resumed = training.train_and_evaluate(config, resumed_dir)
  assert resumed["start_step"] == 4 and resumed["step"] == 6
  a, b = _params(straight_dir, config, 6), _params(resumed_dir, config, 6)
  assert int(a.step) == int(b.step) == 6
  jax.tree.map(np.testing.assert_array_equal, (a.params, a.batch_stats, a.opt_state),
               (b.params, b.batch_stats, b.opt_state))
  assert resumed["eval"] == straight["eval"]

  again = training.train_and_evaluate(config, straight_dir)  # Nothing left to do.
  assert again["start_step"] == again["step"] == 6
  assert again["eval"] == straight["eval"]

  report = training.evaluate_checkpoint(None, resumed_dir)  # The config saved in the workdir.
  with open(os.path.join(resumed_dir, "evaluation.json")) as f:
    on_disk = json.load(f)
  assert on_disk == json.loads(json.dumps(report))
  assert on_disk["step"] == 6 and {"loss", "accuracy", "top5_accuracy"} <= set(on_disk)
  assert on_disk["accuracy"] == pytest.approx(straight["eval"]["accuracy"])
  assert on_disk["loss"] == pytest.approx(straight["eval"]["loss"], rel=1e-6)
  assert on_disk["top5_accuracy"] >= on_disk["accuracy"]
  earlier = training.evaluate_checkpoint(config, resumed_dir, checkpoint_step=2)
  assert earlier["step"] == 2 and earlier["loss"] != on_disk["loss"]
  with pytest.raises(ConfigError, match=r"available steps: \[2, 4, 6\]"):
    training.evaluate_checkpoint(None, resumed_dir, checkpoint_step=5)


@pytest.mark.slow
def test_extending_a_finished_run_says_what_it_does_to_the_schedule(make_config, tmp_path,
                                                                     caplog):
  """The schedule is recomputed for the new length: the warning gives the learning rate
  the step after the checkpoint gets, and the one the finished schedule had there."""
  workdir = str(tmp_path / "run")
  training.train_and_evaluate(make_config(num_train_steps=4), workdir)
  longer = make_config(num_train_steps=8)
  with caplog.at_level(logging.WARNING):
    extended = training.train_and_evaluate(longer, workdir)
  assert (extended["start_step"], extended["step"]) == (4, 8)
  new, old = (float(_schedule(make_config(num_train_steps=n))(4)) for n in (8, 4))
  assert old == 0.0 and new > 0.01  # A cosine that had ended, and one at its middle.
  for fact in ("planned for 4 steps and now has 8", "step 5", f"{new:.4g}", f"{old:.4g}"):
    assert fact in caplog.text, caplog.text


def test_a_warm_up_as_long_as_the_run_is_pointed_out(make_config, tmp_path, caplog):
  with caplog.at_level(logging.WARNING):
    training.train_and_evaluate(make_config(num_train_steps=2, warmup_steps=3),
                                str(tmp_path / "run"))
  assert "warm-up (3 steps) is not shorter than the run (2 steps)" in caplog.text


@pytest.mark.slow
def test_every_option_on_a_tfds_dataset(make_config, tiny_tfds_dir, tmp_path):
  """bfloat16 compute with float32 parameters, an EMA of the weights (evaluated and
  checkpointed), AdamW, clipping, label smoothing, CIFAR augmentation, over TFDS."""
  config = make_config(
      dataset="sasa_test_digits", data_dir=tiny_tfds_dir, augmentation="cifar",
      batch_size=8, eval_batch_size=16, num_train_steps=3, checkpoint_every_steps=3,
      eval_every_steps=3, compute_dtype="bfloat16", ema_decay=0.99,
      optimizer="adamw", weight_decay=1e-4, base_learning_rate=1e-3, grad_clip_norm=1.0,
      label_smoothing=0.1)
  assert training.create_model(config, 10).dtype == jnp.bfloat16
  workdir = str(tmp_path / "run")
  summary = training.train_and_evaluate(config, workdir)
  assert summary["eval"]["num_examples"] == 40  # The TFDS test split.
  assert np.isfinite(summary["train"]["train/loss"])
  state = _params(workdir, config, 3)
  dtypes = {x.dtype for x in jax.tree.leaves((state.params, state.ema))}
  assert dtypes == {np.dtype(np.float32)}
  moved = jax.tree.map(lambda e, p: float(np.abs(e - p).max()),
                       state.ema["params"], state.params)
  assert max(jax.tree.leaves(moved)) > 0  # The EMA lags the weights.
  report = training.evaluate_checkpoint(None, workdir)
  assert report["weights"] == "ema" and set(report["metrics"]) == {"params", "ema"}
  assert report["accuracy"] == report["metrics"]["ema"]["accuracy"]
  assert report["metrics"]["params"]["loss"] == pytest.approx(
      summary["eval_params"]["loss"], rel=1e-5)
