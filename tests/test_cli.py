import pytest

from telelora import cli

from .conftest import REPO


def test_unknown_flags_are_dropped_with_their_values():
    _, subs = cli.build_parser()
    argv = [
        "--model",
        "m",
        "--new_flag",
        "v",
        "--other=3",
        "--bare",
        "--output_dirpath",
        "o",
        "--switch",
        "--many",
        "a",
        "b",
        "-v",
        "--negative",
        "-1.5",
        "--batch_size",
        "1",
    ]
    assert cli.drop_unknown_flags(argv, subs["mitigate"]) == [
        "--model",
        "m",
        "--output_dirpath",
        "o",
        "--batch_size",
        "1",
    ]


def test_batch_size_arrives_as_a_string_and_is_parsed():
    parser, _ = cli.build_parser()
    args = parser.parse_args(["mitigate", "--model", "m", "--output_dirpath", "o", "--batch_size", "4"])
    assert args.mitigate.batch_size == 4


def test_help_lists_the_three_modes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(mode in out for mode in ("configure", "mitigate", "test"))
    assert (REPO / "entrypoint.py").is_file()
