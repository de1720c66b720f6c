"""Bad spec input through the `gentrain` command: a clear `error:` naming the file, the spec
path and the fix, never a traceback, a silent default, an echoed secret or Ray starting."""

import textwrap

import pytest

import gentrain.launch.local
from gentrain.cli import main
from gentrain.redaction import describe, redact
from gentrain.schema import SpecError
from gentrain.spec_checks import check_storage
from gentrain.validation import from_dict, load_spec

HEAD = "name: mine\njob: {type: vae}\n"
SECRET = "S3CRETvalue"


def spec_file(tmp_path, text: str, name: str = "spec.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def refused(capsys, *argv) -> str:
    """Run `gentrain ARGV`; it must exit 2 with an `error:` line; return stdout + stderr."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.startswith("error: "), err
    return out + err


@pytest.fixture
def no_ray(monkeypatch):
    """`gentrain run` must refuse these specs before it starts Ray: fail if it gets there."""
    def run(job):
        raise AssertionError(f"Ray would have started for {job.spec.name}")

    monkeypatch.setattr(gentrain.launch.local, "run", run)


# -- name -----------------------------------------------------------------------------
@pytest.mark.parametrize("name, says", [
    (r'"a\0b"', r"contains '\x00'"), (r'"a\tb"', r"contains '\t'"), ("a/b", "contains '/'"),
    (r"'a\b'", r"contains '\\'"), ("'..'", "starts with '.'"), ("'.'", "starts with '.'"),
    (".hidden", "starts with '.'"), ("''", "name: is empty"), ("x" * 101, "101 characters"),
])
def test_name_is_one_safe_path_component(tmp_path, capsys, name, says):
    path = spec_file(tmp_path, f"name: {name}\njob: {{type: vae}}\n")
    text = refused(capsys, "validate", path)
    assert path in text and says in text
    assert "run folder <storage_path>/<name>" in text or "shorten it" in text


# -- storage --------------------------------------------------------------------------
def test_empty_storage_path_is_refused(capsys):
    text = refused(capsys, "validate", "vae/debug", "storage_path=")
    assert "storage_path: is empty; set the folder runs are written under" in text


@pytest.mark.parametrize("where", ["proc", "file-in-the-way"])
def test_unwritable_storage_refused_by_run_before_ray(tmp_path, capsys, no_ray, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    storage = "/proc/gentrain-runs" if where == "proc" else str(blocker / "runs")
    text = refused(capsys, "run", "vae/debug", f"storage_path={storage}")
    assert f"storage_path: cannot create or write '{storage}'" in text or "is a file, not a folder" in text
    assert "choose a folder you can write" in text


def test_storage_check_creates_nothing_it_leaves_behind(tmp_path):
    storage = tmp_path / "new" / "runs"
    spec = load_spec("vae/debug", [f"storage_path={storage}"])
    assert check_storage(spec) == [] and not (tmp_path / "new").exists()
    assert check_storage(from_dict({"job": {"type": "vae"}, "storage_path": "s3://bucket/runs"})) == []


@pytest.mark.parametrize("field", ["storage_path", "data.source", "eval.inception_weights"])
def test_unknown_user_in_a_path_names_the_field(capsys, field):
    text = refused(capsys, "validate", "vae/debug", f"{field}=~nosuchuser-gentrain/x")
    assert f"{field}: '~nosuchuser-gentrain/x': there is no home folder for user" in text


# -- secrets --------------------------------------------------------------------------
SECRET_URIS = [
    f"http://user:{SECRET}@mlflow.example.com",
    f"HTTPS://user:{SECRET}@mlflow.example.com:5000/path",
    f"https://{SECRET}@mlflow.example.com",
    f"postgresql://user:{SECRET}@db.example.com/mlflow",
    f"mysql+pymysql://user:{SECRET}@db.example.com/mlflow",
    f"https://mlflow.example.com/?password={SECRET}",
    f"https://mlflow.example.com/?a=1&token={SECRET}",
    f"https://mlflow.example.com/?access_token={SECRET}",
    f"https://mlflow.example.com/?API_KEY={SECRET}",
    f"https://mlflow.example.com/?client_secret={SECRET}",
]


@pytest.mark.parametrize("uri", SECRET_URIS)
def test_secret_in_tracking_uri_refused_by_validate_and_never_echoed(tmp_path, capsys, uri):
    path = spec_file(tmp_path, f"{HEAD}tracking: {{uri: '{uri}'}}\n")
    for argv in (["validate", path], ["validate", "--print", path], ["validate", "vae/debug", f"tracking.uri={uri}"]):
        text = refused(capsys, *argv)
        assert SECRET not in text
        assert "tracking.uri: " in text and "secrets never go in a spec" in text
        assert "MLFLOW_TRACKING_URI" in text if uri.startswith(("postgresql", "mysql")) else \
            "MLFLOW_TRACKING_PASSWORD" in text and "MLFLOW_TRACKING_TOKEN" in text


def test_secret_refused_by_run_before_ray_and_by_submit_before_the_cluster(tmp_path, capsys, no_ray):
    path = spec_file(tmp_path, f"{HEAD}tracking: {{uri: 'http://u:{SECRET}@h'}}\nstorage_path: /shared/runs\n")
    for argv in (["run", path], ["submit", path, "--address", "http://127.0.0.1:1"]):
        text = refused(capsys, *argv)
        assert SECRET not in text and "tracking.uri: 'http://***@h' holds credentials (user info)" in text


@pytest.mark.parametrize("field, value", [
    ("data.source", f"s3://bucket/set?X-Amz-Signature={SECRET}"),
    ("data.source", f"https://user:{SECRET}@data.example.com/set"),
    ("eval.inception_weights", f"https://host/w.pth?token={SECRET}"),
])
def test_secret_in_other_urls_refused(capsys, field, value):
    text = refused(capsys, "validate", "vae/debug", f"{field}={value}")
    assert f"{field}: " in text and "holds credentials" in text and SECRET not in text


def test_a_secret_in_any_message_is_redacted():
    assert redact(f"see http://u:{SECRET}@h/x and s3://b/k?sig={SECRET}&v=1") == \
        "see http://***@h/x and s3://b/k?sig=***&v=1"
    long_secret = f"http://user:{SECRET * 20}@host"  # redacted whole, then cut
    assert SECRET not in describe(long_secret) + describe([long_secret]) + describe({"k": [long_secret]})
    problems = SpecError([f"tracking: expected a mapping, got 'https://{SECRET}@h'"]).problems
    assert SECRET not in problems[0]
    with pytest.raises(SpecError) as info:  # a value in the wrong place is redacted too
        from_dict({"job": {"type": "vae"}, "tracking": f"http://u:{SECRET}@h"})
    assert SECRET not in str(info.value) and "http://***@h" in str(info.value)


# -- size of what is echoed, and of what is read -------------------------------------
BILLION_LAUGHS = textwrap.dedent("""\
    a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
    b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
    c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
    d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
    e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
    f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
    g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
    h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
    i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
    name: [*i,*i,*i,*i,*i,*i,*i,*i,*i]
    job: {type: vae}
    """)


def test_alias_bomb_is_refused_with_a_short_message(tmp_path, capsys):
    text = refused(capsys, "validate", spec_file(tmp_path, BILLION_LAUGHS))
    assert "expands to more than 100,000 values" in text and len(text) < 2000


def test_long_values_are_cut_in_messages(capsys):
    text = refused(capsys, "validate", "vae/debug", "train.steps=" + "x" * 5000)
    assert "train.steps: 'xxxx" in text and "... (5000 chars) is not int" in text and len(text) < 1000
    assert describe(list(range(10**6))).startswith("[0, 1, 2, 3, 4, 5, 6, 7, ...]")


def test_nesting_beyond_fifty_levels_is_refused(tmp_path, capsys):
    text = refused(capsys, "validate", spec_file(tmp_path, HEAD + "x: " + "[" * 5000 + "]" * 5000 + "\n"))
    assert "line 3, column 53: nesting deeper than 50 levels" in text
    text = refused(capsys, "validate", "vae/debug", "job.config." + ".".join(["a"] * 60) + "=1")
    assert "62 levels deep; spec fields are a few levels deep" in text


def test_huge_binary_and_empty_files_are_refused(tmp_path, capsys):
    big = tmp_path / "big.yaml"
    big.write_text(HEAD + "# padding\n" * 1_100_000)
    assert "the file is over 10 MB" in refused(capsys, "validate", str(big))
    binary = tmp_path / "model.yaml"
    binary.write_bytes(b"\x80\x02}q\x00(X\x04\x00\x00\x00name")
    text = refused(capsys, "validate", str(binary))
    assert str(binary) in text and "not a UTF-8 text file (byte 0: b'\\x80')" in text
    binary.write_bytes(b"name: x\x00\x00\x00")
    assert "contains NUL bytes (first at byte 7)" in refused(capsys, "validate", str(binary))
    for text in ("", "# nothing but a comment\n\n", "---\n"):
        message = refused(capsys, "validate", spec_file(tmp_path, text))
        assert "the spec file is empty; a spec needs at least `job.type`" in message


@pytest.mark.parametrize("body", ["name: x\n", "name: x\njob:\n", "name: x\njob: {config: {}}\n"])
def test_a_spec_must_name_its_job_type(tmp_path, capsys, body):
    text = refused(capsys, "validate", spec_file(tmp_path, body))
    assert "job: missing; every spec names its job type" in text or "job.type: missing" in text


# -- YAML strictness ------------------------------------------------------------------
def test_duplicate_keys_are_refused_naming_key_and_lines(tmp_path, capsys):
    text = refused(capsys, "validate", spec_file(tmp_path, HEAD + "train:\n  steps: 5\n  steps: 7\n"))
    assert "line 5, column 3: train.steps: duplicate key (first at line 4)" in text
    text = refused(capsys, "validate", spec_file(tmp_path, HEAD + "name: again\n"))
    assert "name: duplicate key (first at line 1)" in text


def test_merge_keys_still_override(tmp_path):
    spec = load_spec(spec_file(tmp_path, HEAD + "train: {<<: {steps: 5, batch_size: 3}, steps: 9}\n"))
    assert (spec.train.steps, spec.train.batch_size) == (9, 3)


def test_base_60_numbers_are_not_read_as_numbers(tmp_path, capsys):
    text = refused(capsys, "validate", spec_file(tmp_path, HEAD + "train: {steps: 1:30}\n"))
    assert "train.steps: '1:30' is not int (YAML 1.1 would read it as a base-60 number" in text
    assert "train.steps: '1:30' is not int" in refused(capsys, "validate", "vae/debug", "train.steps=1:30")
    assert load_spec(spec_file(tmp_path, HEAD + "data: {train_split: 1:30}\n")).data.train_split == "1:30"


@pytest.mark.parametrize("override, says", [
    ("train.optimizer.lr=.inf", "train.optimizer.lr: inf is not a finite number"),
    ("train.optimizer.lr=-.INF", "train.optimizer.lr: -inf is not a finite number"),
    ("train.optimizer.lr=nan", "train.optimizer.lr: 'nan' is not a finite number"),
    ("scaling.resources_per_worker.CPU=.nan", "scaling.resources_per_worker.CPU: nan is not a finite number"),
    ("train.grad_clip=.inf", "train.grad_clip: inf is not a finite number"),
    ("train.optimizer.betas=[0.9, .nan]", "train.optimizer.betas[1]: nan is not a finite number"),
    (f"scaling.num_workers={2**64 + 1}", f"scaling.num_workers: {2**64 + 1} is out of range"),
    ("train.steps=" + "9" * 4000, "train.steps: an integer of about 400"),
])
def test_non_finite_and_absurd_numbers_are_refused_with_their_path(capsys, override, says):
    assert says in refused(capsys, "validate", "vae/debug", override)


def test_yaml_construction_errors_name_file_line_and_path(tmp_path, capsys):
    path = spec_file(tmp_path, HEAD + "train:\n  steps: !!int notanint\n")
    text = refused(capsys, "validate", path)
    assert f"{path} has 1 problem" in text
    assert "line 4, column 10: train.steps: 'notanint' cannot be read as !!int" in text
    text = refused(capsys, "validate", spec_file(tmp_path, HEAD + "train: {steps: " + "7" * 5000 + "}\n"))
    assert "line 3, column 16: train.steps: '7777" in text and "(5000 chars) cannot be read as !!int" in text
    assert "quote it to make it a string" in text
    text = refused(capsys, "validate", "vae/debug", "train.steps=!!float x")
    assert "override 'train.steps': 'x' cannot be read as !!float" in text


def test_syntax_errors_and_python_tags_name_the_line(tmp_path, capsys):
    text = refused(capsys, "validate", spec_file(tmp_path, HEAD + "train: {steps: 5\n"))
    assert "not valid YAML" in text and "line 4" in text
    text = refused(capsys, "validate", spec_file(tmp_path, HEAD + "x: !!python/object/apply:os.system [ls]\n"))
    assert "line 3, column 4: not valid YAML: could not determine a constructor" in text
