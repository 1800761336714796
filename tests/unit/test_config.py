"""The config system: YAML + dotted overrides, unknown keys rejected with the valid ones listed."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncgrpo.config import ConfigError, RunConfig, describe, dump_config, load_config, parse_overrides


def test_defaults_are_valid_and_documented() -> None:
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.actor.group_size == 8 and cfg.actor.adv_norm.std_level == "group"
    rows = describe()
    keys = {k for k, _, _ in rows}
    for key in ["actor.path", "ref.path", "actor.group_size", "actor.adv_norm.mean_level", "actor.adv_norm.std_level",
                "actor.eps_clip", "actor.eps_clip_higher", "actor.c_clip", "actor.behav_imp_weight_cap",
                "actor.behav_imp_weight_mode", "actor.loss_agg_mode", "actor.kl_ctl", "actor.kl_estimator",
                "rollout.max_head_offpolicyness", "rollout.dynamic_filtering", "actor.adv_estimator", "actor.policy_loss", "actor.overlong_penalty.enabled",
                "optimizer.lr", "total_train_epochs", "train_dataset.batch_size"]:
        assert key in keys, key
    assert all(doc for _, _, doc in rows), [k for k, _, d in rows if not d]


def test_yaml_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("actor:\n  group_size: 4\n  eps_clip: 0.1\noptimizer:\n  lr: 1.0e-5\n")
    cfg = load_config([f], ["--actor.group_size=16", "--actor.adv_norm.std_level", "none", "--rollout.max-head-offpolicyness=0"])
    assert cfg.actor.group_size == 16
    assert cfg.actor.eps_clip == 0.1
    assert cfg.optimizer.lr == 1e-5
    assert cfg.actor.adv_norm.std_level == "none"
    assert cfg.rollout.max_head_offpolicyness == 0


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = load_config(overrides=["--actor.c_clip=3", "--reward.fns=[boxed, gsm8k]"])
    f = tmp_path / "dumped.yaml"
    f.write_text(dump_config(cfg))
    assert load_config([f]) == cfg


def test_unknown_key_lists_valid_ones_and_suggests() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["--actor.grup_size=4"])
    msg = str(e.value)
    assert "actor.grup_size" in msg and "Did you mean 'actor.group_size'" in msg and "eps_clip" in msg


def test_unknown_top_level_key_in_yaml(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("actr:\n  group_size: 4\n")
    with pytest.raises(ConfigError, match="unknown config key 'actr'.*Did you mean 'actor'"):
        load_config([f])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("--actor.eps_clip=-1", "actor.eps_clip"),
        ("--actor.adv_norm.mean_level=grup", "actor.adv_norm.mean_level"),
        ("--actor.loss_agg_mode=mean", "actor.loss_agg_mode"),
        ("--actor.kl_estimator=k4", "actor.kl_estimator"),
        ("--actor.group_size=zero", "actor.group_size"),
        ("--actor.c_clip=0.5", "actor.c_clip"),
        ("--actor.eps_clip_higher=0.1", "eps_clip_higher"),
        ("--reward.fns=[nope]", "reward.fns"),
    ],
)
def test_bad_values_name_the_field(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(overrides=[override])


def test_override_syntax_errors() -> None:
    with pytest.raises(ConfigError, match="no value"):
        parse_overrides(["--actor.group_size"])
    with pytest.raises(ConfigError, match="overrides look like"):
        parse_overrides(["actor.group_size=3"])


def test_missing_file_is_clear() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(["/nonexistent/run.yaml"])


@pytest.mark.parametrize(("overrides", "fragment"), [
    (["--actor.adv_estimator=ppo"], "actor.adv_estimator='ppo' is not a registered advantage estimator; choose one of ['dr_grpo', 'grpo'"),
    (["--actor.policy_loss=trpo"], "actor.policy_loss='trpo' is not a registered policy loss; choose one of ['gspo', 'ppo']"),
    (["--actor.adv_estimator=rloo", "--actor.adv_norm.std_level=batch"], "actor.adv_norm.std_level applies to adv_estimator=grpo only"),
    (["--actor.policy_loss=gspo"], "set actor.eps_clip (GSPO uses 3e-4)"),
    (["--actor.policy_loss=gspo", "--actor.eps_clip=3e-4", "--actor.loss_agg_mode=token-mean"], "needs actor.loss_agg_mode=seq-mean-token-mean"),
    (["--actor.use_kl_in_reward=true"], "needs actor.kl_ctl > 0"),
    (["--actor.policy_loss=gspo", "--actor.eps_clip=3e-4", "--actor.adv_estimator=grpo_process"],
     "grpo_process gives one per token: use policy_loss=ppo with it"),
    (["--reward.fns=[prm]"], "reward.prm.url is not set"),
    (["--actor.behav_imp_weight_floor=0.5"], "it needs actor.behav_imp_weight_mode=mask"),
    (["--actor.dynamic_filtering=true", "--rollout.dynamic_filtering=false"],
     "config key 'actor.dynamic_filtering' moved to 'rollout.dynamic_filtering', and both are given"),
])
def test_algorithm_choices_are_checked_against_the_registries(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    assert fragment in str(e.value), str(e.value)


def test_algorithm_choices_that_fit_together_load() -> None:
    cfg = load_config(overrides=["--actor.policy_loss=gspo", "--actor.eps_clip=3e-4", "--actor.eps_clip_higher=4e-4",
                                 "--actor.adv_estimator=reinforce_plus_plus", "--actor.adv_norm.std_unbiased=false",
                                 "--actor.behav_imp_weight_level=geometric", "--actor.kl_ctl=0.01",
                                 "--actor.use_kl_in_reward=true", "--rollout.dynamic_filtering=true"])
    a = cfg.actor
    assert (a.policy_loss, a.adv_estimator, a.behav_imp_weight_level, a.use_kl_in_reward) == \
        ("gspo", "reinforce_plus_plus", "geometric", True)
    assert cfg.rollout.dynamic_filtering


def test_an_example_config_takes_another_estimator_by_override() -> None:
    # the example spells out adv_norm's defaults; that must not block switching the estimator on the command line
    example = Path(__file__).resolve().parents[2] / "examples" / "tiny_arithmetic.yaml"
    cfg = load_config([example], ["--actor.adv_estimator=reinforce_plus_plus"])
    assert cfg.actor.adv_estimator == "reinforce_plus_plus"


@pytest.mark.parametrize(("fns", "fragment"), [
    ("[gsm9k]", "reward.fns: 'gsm9k' is not a built-in reward function (boxed, exact, gsm8k, orm, prm)"),
    ("['a b:c']", "is not an import path; write package.module:function"),
    ("[orm]", "reward.fns has 'orm' but reward.orm.url is not set"),
])
def test_reward_fns_are_checked_when_the_config_loads(fns: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[f"--reward.fns={fns}"])
    assert fragment in str(e.value), str(e.value)


def test_a_plugin_path_is_not_imported_by_loading_a_config() -> None:
    # a trainer node need not have the rollout's reward modules: only the form is checked here
    cfg = load_config(overrides=["--reward.fns=[no_such_package.rewards:score, gsm8k]", "--reward.weights=[0.5, 1.0]"])
    assert cfg.reward.fns == ["no_such_package.rewards:score", "gsm8k"]
    cfg = load_config(overrides=["--reward.fns=[orm]", "--reward.orm.url=http://127.0.0.1:30010"])
    assert cfg.reward.orm.url == "http://127.0.0.1:30010"


def test_a_moved_key_is_read_in_its_new_place(tmp_path: Path) -> None:
    # a run directory's config.yaml written before the move (a full dump) still loads, so `up --resume` works
    f = tmp_path / "config.yaml"
    f.write_text("actor:\n  dynamic_filtering: true\n  group_size: 4\n")
    cfg = load_config([f])
    assert cfg.rollout.dynamic_filtering is True and cfg.actor.group_size == 4


@pytest.mark.parametrize("name", sorted(__import__("asyncgrpo.config.presets", fromlist=["PRESETS"]).PRESETS))
def test_every_preset_is_a_valid_config_with_its_keys(name: str) -> None:
    from asyncgrpo.config.presets import PRESETS

    cfg = load_config(overrides={"preset": name})

    def check(section: object, keys: dict, where: str) -> None:
        for k, v in keys.items():
            if isinstance(v, dict):
                check(getattr(section, k), v, f"{where}{k}.")
            else:
                assert getattr(section, k) == v, f"preset {name}: {where}{k} = {getattr(section, k)!r}, want {v!r}"

    check(cfg, PRESETS[name], "")
    assert cfg.preset == name


def test_a_preset_sits_beneath_the_users_keys() -> None:
    cfg = load_config(overrides=["--preset=dapo", "--actor.eps_clip_higher=0.3", "--rollout.dynamic_filtering=false"])
    assert (cfg.actor.eps_clip_higher, cfg.actor.loss_agg_mode, cfg.rollout.dynamic_filtering) == (0.3, "token-mean", False)
    assert load_config().actor.loss_agg_mode == "seq-mean-token-mean"  # no preset: the schema's defaults
    with pytest.raises(ConfigError, match=r"'ppo' is not a preset; choose one of \['dapo', 'dr_grpo', 'grpo'"):
        load_config(overrides=["--preset=ppo"])
    with pytest.raises(ConfigError, match="gives one per token: use policy_loss=ppo"):
        load_config(overrides=["--preset=grpo_process", "--actor.policy_loss=gspo", "--actor.eps_clip=3e-4"])


def test_the_renamed_fallback_key_still_loads_into_its_new_name() -> None:
    from asyncgrpo.config.loader import load_config

    assert load_config(overrides={"weight_sync": {"auto_disk_fallback": False}}).weight_sync.transport_fallback is False
    assert load_config().weight_sync.transport_fallback is True
