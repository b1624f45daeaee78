"""`python -m build_engines` flags: defaults and the default output folder."""

from pathlib import Path

from build_engines.__main__ import build_parser, config_from_args


def parse(*argv):
    return config_from_args(build_parser().parse_args(list(argv)))


def test_defaults_are_sd_turbo_512_one_step_in_a_folder_named_by_the_specialisation():
    cfg = parse()
    assert (cfg.model, cfg.height, cfg.width, cfg.steps, cfg.precision.value) == ("sd-turbo", 512, 512, 1, "fp16")
    assert cfg.out == Path("engines/sd-turbo-512x512-b1-dyme1-taesd-fp16")


def test_default_folder_changes_with_everything_the_engines_are_specialised_for():
    base = parse("--model", "tiny").out
    others = {
        parse("--model", "tiny", "--height", "64").out,
        parse("--model", "tiny", "--steps", "2").out,
        parse("--model", "tiny", "--steps", "2", "--cfg-type", "full").out,  # UNet batch 4
        parse("--model", "tiny", "--bank", "fifo", "--bank-frames", "2").out,
        parse("--model", "tiny", "--vae", "full").out,
        parse("--model", "tiny", "--precision", "fp32").out,
    }
    assert base not in others and len(others) == 6
    # Guidance and steps matter only through the UNet batch: the same engines serve both.
    assert parse("--model", "tiny", "--cfg-type", "full").out == parse("--model", "tiny", "--steps", "2").out
    assert parse("--model", "tiny", "--out", "mine").out == Path("mine")
