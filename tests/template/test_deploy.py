"""Issue #15: the template deploys right, not only lint-clean. Each test reads template.yaml /
samconfig.toml / the deploy docs as `sam build && sam deploy` would use them (cfn.py renders the
SAM transform with parameters substituted) and checks one way a real deploy misbehaved."""

import re

import pytest

import cfn
from cfn import ROOT, as_list, render, resources_of_type, statements


def function(rendered: dict) -> dict:
    return rendered["Resources"]["ProxyFunction"]["Properties"]


def role_of_function(rendered: dict) -> dict:
    role = function(rendered)["Role"]
    assert role.get("Fn::GetAtt", [None])[0], f"the function's role is not a resource of the stack: {role}"
    return rendered["Resources"][role["Fn::GetAtt"][0]]


# 1 ------------------------------------------------------------------------------------------
def test_build_and_deploy_read_the_same_architecture():
    """`sam build` resolves parameters from its own overrides and `sam deploy` from the saved or
    guided answers: an architecture taken from a parameter can differ between the two (an arm64
    bootstrap on an x86_64 function fails every request). Both must read one fixed value."""
    template = cfn.load_template()
    archs = template["Resources"]["ProxyFunction"]["Properties"].get("Architectures")
    globals_archs = template.get("Globals", {}).get("Function", {}).get("Architectures")
    chosen = archs if archs is not None else globals_archs
    assert isinstance(chosen, list) and len(chosen) == 1, chosen
    assert chosen[0] in ("arm64", "x86_64"), f"Architectures must be a literal, not {chosen[0]!r}"
    assert chosen == ["arm64"], "spec §9: arm64 by default"
    assert "Architecture" not in template.get("Parameters", {})
    # Nothing in samconfig.toml may feed an architecture to only one of the commands.
    for env, commands in cfn.load_samconfig().items():
        for command, section in commands.items() if isinstance(commands, dict) else []:
            overrides = section.get("parameters", {}).get("parameter_overrides", "")
            assert "Architecture" not in str(overrides), f"[{env}.{command}] overrides the architecture"
    assert "rchitecture" not in cfn.SAMCONFIG.read_text().split("version = ", 1)[1]
    # The build helper checks the artifact against the template's value, not an override.
    build = (ROOT / "tools/sam-build.sh").read_text()
    assert "--parameter-overrides" not in build


# 2 ------------------------------------------------------------------------------------------
def flush_timeout_ms() -> int:
    src = cfn.rust_source("src/telemetry/cloudwatch.rs")
    m = re.search(r"pub const PUT_TIMEOUT: Duration = Duration::from_secs\((\d+)\);", src)
    assert m, "PUT_TIMEOUT not found in src/telemetry/cloudwatch.rs"
    return int(m.group(1)) * 1000


def test_lambda_timeout_leaves_room_for_the_post_response_metrics_flush():
    """Lambda's timeout covers the extension's PutMetricData after the answer. The answer may
    come ~29.5 s after the gateway's start; the flush may then take PUT_TIMEOUT. Timeout 31 s
    killed the environment on exactly the bad days."""
    rendered = render()
    timeout_ms = int(function(rendered)["Timeout"]) * 1000
    gateway_ms = max(
        int(e["Properties"].get("TimeoutInMillis", 30000))
        for e in cfn.load_template()["Resources"]["ProxyFunction"]["Properties"]["Events"].values()
        if e["Type"] == "HttpApi"
    )
    flush_ms = flush_timeout_ms()
    skew_ms = 1000  # the gateway's clock starts before Lambda's; startup, clock skew
    assert timeout_ms >= gateway_ms + flush_ms + skew_ms, (timeout_ms, gateway_ms, flush_ms)
    # The reserve the function keeps before the Lambda deadline is that same flush timeout, and
    # behind the HTTP API it must not shorten the gateway's 30 s.
    budget = cfn.rust_source("src/deadline.rs")
    assert re.search(r"pub const METRICS_FLUSH_RESERVE_MS: u64 =\s*crate::telemetry::cloudwatch::PUT_TIMEOUT", budget)
    assert timeout_ms - flush_ms >= gateway_ms + skew_ms
    # The deadline section of the docs names the reserve.
    retries = (ROOT / "docs/retries.md").read_text()
    deadline_section = retries.split("## The deadline budget", 1)[1].split("\n## ", 1)[0]
    assert "METRICS_FLUSH_RESERVE_MS" in deadline_section


# 3 ------------------------------------------------------------------------------------------
def test_platform_start_end_report_records_are_logged_by_default():
    """START/END/REPORT are INFO-level platform records: at SystemLogLevel WARN there is no
    Duration / Init Duration / Max Memory Used in the logs."""
    logging = function(render())["LoggingConfig"]
    assert logging["LogFormat"] == "JSON"
    assert logging["SystemLogLevel"] in ("INFO", "DEBUG"), logging
    assert cfn.load_template()["Parameters"]["SystemLogLevel"]["Default"] == "INFO"
    assert logging["ApplicationLogLevel"] == "INFO"


# 4 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("param", ["OpenAIApiKeySecretArn", "ProxyApiKeysSecretArn"])
def test_secret_arns_must_be_complete(param):
    """IAM matches GetSecretValue against the complete ARN (with the -XXXXXX suffix); a partial
    ARN in the policy would deny every read while the parameter looked fine."""
    accepts = lambda v: cfn.parameter_accepts(param, v)  # noqa: E731
    assert accepts("")
    assert accepts(cfn.OPENAI_SECRET)
    assert accepts("arn:aws-cn:secretsmanager:cn-north-1:123456789012:secret:prod/proxy_tokens+v2-a1B2c3")
    partial = cfn.OPENAI_SECRET.rsplit("-", 1)[0]
    assert not accepts(partial), "a partial ARN (no -XXXXXX suffix) must be refused"
    assert not accepts("arn:aws:secretsmanager:us-east-1:123456789012:secret:openai-proxy/openai-api-key")
    assert not accepts("openai-proxy/openai-api-key-AbCdEf"), "a bare name is not an ARN"


def test_secret_grants_match_the_complete_arn_iam_checks():
    """IAM evaluates GetSecretValue against the secret's complete ARN, whichever form the
    function was given; the grants must match it (IAM wildcards: ? one character, * any)."""
    from fnmatch import fnmatchcase

    def granted(given: dict, actual_arn: str) -> bool:
        grants = [
            s for s in statements(role_of_function(render(given)))
            if "secretsmanager:GetSecretValue" in as_list(s["Action"])
        ]
        return any(fnmatchcase(actual_arn, r) for s in grants for r in as_list(s["Resource"]))

    prefix = "arn:aws:secretsmanager:us-east-1:123456789012:secret:"
    tokens = prefix + "proxy-tokens-Q1w2E3"  # a name ending in "-" + 6 characters
    for given in [tokens, prefix + "proxy-tokens"]:  # complete, and partial that looks complete
        assert cfn.parameter_accepts("ProxyApiKeysSecretArn", given)
        assert granted({"ProxyApiKeysSecretArn": given}, tokens), given
    assert granted({}, cfn.OPENAI_SECRET) and granted({}, cfn.TOKENS_SECRET)
    # Nothing else: not another secret sharing the prefix, not a longer name.
    assert not granted({}, prefix + "openai-proxy/openai-api-key-old-XyZ123")
    assert not granted({}, prefix + "openai-proxy/other-AbCdEf")
    assert not granted({"ProxyApiKeysSecretArn": prefix + "proxy-tokens"}, prefix + "proxy-tokens-v2-Q1w2E3")


# 5 ------------------------------------------------------------------------------------------
def test_log_writes_are_scoped_to_the_functions_own_log_group():
    """AWSLambdaBasicExecutionRole (which SAM attaches to a role it generates) allows log writes
    on "*". The function's role may write only to its own log group."""
    rendered = render()
    role = role_of_function(rendered)
    assert not role["Properties"].get("ManagedPolicyArns"), role["Properties"].get("ManagedPolicyArns")
    for r in resources_of_type(rendered, "AWS::IAM::Role").values():
        for arn in r["Properties"].get("ManagedPolicyArns", []):
            assert "AWSLambdaBasicExecutionRole" not in str(arn)
    stmts = statements(role)
    log_stmts = [s for s in stmts if any(str(a).startswith("logs:") for a in as_list(s["Action"]))]
    assert log_stmts, "the function must still be allowed to write its logs"
    own_group = {"Fn::GetAtt": ["ProxyLogGroup", "Arn"]}
    for s in log_stmts:
        assert set(as_list(s["Action"])) <= {"logs:CreateLogStream", "logs:PutLogEvents"}, s
        assert as_list(s["Resource"]) == [own_group], s
    assert function(rendered)["LoggingConfig"]["LogGroup"] == {"Ref": "ProxyLogGroup"}
    # Nothing else on "*" except PutMetricData, which is scoped by its namespace condition.
    for s in stmts:
        if "*" in as_list(s["Resource"]):
            assert as_list(s["Action"]) == ["cloudwatch:PutMetricData"], s
            assert s["Condition"]["StringEquals"]["cloudwatch:namespace"] == "OpenAIProxy"


# 6 ------------------------------------------------------------------------------------------
def test_metrics_namespace_reserved_for_aws_is_refused():
    """PutMetricData rejects namespaces starting with AWS/: every invocation's metrics would be
    dropped (and only a WARN line would tell)."""
    accepts = lambda v: cfn.parameter_accepts("MetricsNamespace", v)  # noqa: E731
    assert accepts("OpenAIProxy")
    assert accepts("Team/AWS/Proxy")
    assert not accepts("AWS/Lambda")
    assert not accepts("AWS/")
    assert not accepts(":leading-colon")
    assert not accepts("")
    assert not accepts("x" * 256)
    # The config parser refuses it too (src/config.rs, tested there).
    assert "starts_with(\"AWS/\")" in cfn.rust_source("src/config.rs")


# 7 ------------------------------------------------------------------------------------------
def test_upstream_parameter_and_proxy_output_have_distinct_names():
    """One `OpenAIBaseUrl` was the upstream parameter and another the proxy's URL output: the
    guided prompt invited pasting the proxy's own URL as its upstream."""
    template = cfn.load_template()
    params, outputs = set(template["Parameters"]), set(template["Outputs"])
    for name in params & outputs:  # only an output that echoes its own parameter may share its name
        assert template["Outputs"][name]["Value"] == {"Ref": name}, f"{name} is a parameter and another output"
    assert "OpenAIBaseUrl" not in params | outputs
    rendered = render({"UpstreamBaseUrl": "https://example-resource.openai.azure.com/openai/v1"})
    env = function(rendered)["Environment"]["Variables"]
    assert env["OPENAI_BASE_URL"] == "https://example-resource.openai.azure.com/openai/v1"
    proxy_url = rendered["Outputs"]["ProxyBaseUrl"]["Value"]
    assert proxy_url == "https://${HttpApi}.execute-api.us-east-1.amazonaws.com/v1"


def test_upstream_base_url_refuses_the_proxys_own_kind_of_url():
    accepts = lambda v: cfn.parameter_accepts("UpstreamBaseUrl", v)  # noqa: E731
    own = render()["Outputs"]["ProxyBaseUrl"]["Value"].replace("${HttpApi}", "a1b2c3d4e5")
    for url in [
        own,
        "https://a1b2c3d4e5.execute-api.eu-west-1.amazonaws.com/v1",
        "https://a1b2c3d4e5.execute-api.eu-west-1.amazonaws.com/prod/v1",
        "https://abcdefghijklmnopqrstuvwxyz.lambda-url.us-east-1.on.aws/v1",
        "https://abcdefghijklmnopqrstuvwxyz.lambda-url.us-east-1.on.aws",
        "ftp://api.openai.com/v1",
        "https://api.openai.com/v1?x=1",
        "",
    ]:
        assert not accepts(url), url
    for url in [
        cfn.load_template()["Parameters"]["UpstreamBaseUrl"]["Default"],
        "https://api.openai.com/v1",
        "https://example-resource.openai.azure.com/openai/v1",
        "http://10.0.0.12:8080/v1",
        "https://llm-gateway.example.com/openai/v1",
    ]:
        assert accepts(url), url


# 8 ------------------------------------------------------------------------------------------
def test_http_api_throttles_before_the_function_is_invoked():
    """Client auth happens inside the function, so every request (even unauthenticated) is a
    billed invocation: the gateway's default route throttling bounds a flood."""
    defaults = render()
    stages = resources_of_type(defaults, "AWS::ApiGatewayV2::Stage")
    assert len(stages) == 1, stages
    settings = next(iter(stages.values()))["Properties"]["DefaultRouteSettings"]
    params = cfn.load_template()["Parameters"]
    assert settings["ThrottlingRateLimit"] == str(params["ThrottlingRateLimit"]["Default"])
    assert settings["ThrottlingBurstLimit"] == str(params["ThrottlingBurstLimit"]["Default"])
    assert 0 < float(settings["ThrottlingRateLimit"]) <= 1000
    assert 0 < int(settings["ThrottlingBurstLimit"]) <= 5000
    custom = render({"ThrottlingRateLimit": 7, "ThrottlingBurstLimit": 11})
    settings = next(iter(resources_of_type(custom, "AWS::ApiGatewayV2::Stage").values()))["Properties"][
        "DefaultRouteSettings"
    ]
    assert (settings["ThrottlingRateLimit"], settings["ThrottlingBurstLimit"]) == ("7", "11")
    # Reserved concurrency: optional, off by default, a number when set.
    assert "ReservedConcurrentExecutions" not in function(defaults)
    assert function(render({"ReservedConcurrency": "20"}))["ReservedConcurrentExecutions"] == "20"
    assert not cfn.parameter_accepts("ReservedConcurrency", "many")
    deploy = (ROOT / "docs/deploy.md").read_text()
    assert "ReservedConcurrency" in deploy and "ThrottlingRateLimit" in deploy


# 9 ------------------------------------------------------------------------------------------
MIN_SAM_CLI = "1.156"


def version(text: str) -> tuple:
    return tuple(int(x) for x in text.split("."))


def test_samconfig_and_docs_state_the_right_sam_cli_version_and_resolve_their_pointers():
    samconfig = cfn.SAMCONFIG.read_text()
    assert f"SAM CLI >= {MIN_SAM_CLI}" in samconfig
    assert "1.170" not in samconfig
    readme = (ROOT / "README.md").read_text()
    deploy = (ROOT / "docs/deploy.md").read_text()
    prerequisites = deploy.split("Prerequisites", 1)[1].split("\n## ", 1)[0]
    assert f"SAM CLI {MIN_SAM_CLI}" in prerequisites or f"SAM CLI >= {MIN_SAM_CLI}" in prerequisites
    assert f"SAM CLI {MIN_SAM_CLI}" in readme or f"SAM CLI >= {MIN_SAM_CLI}" in readme
    pinned = re.search(r"^aws-sam-cli==([\d.]+)$", (ROOT / "tools/requirements-sam.txt").read_text(), re.M)
    assert pinned and version(pinned.group(1)) >= version(MIN_SAM_CLI)
    # Every docs/... or tools/... path the deploy files point at exists.
    for path in [cfn.SAMCONFIG, cfn.TEMPLATE, ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for ref in re.findall(r"(?<![\w/.-])((?:docs|tools)/[\w./-]+\.(?:md|sh|txt|py))", path.read_text()):
            assert (ROOT / ref).is_file(), f"{path.name} points at {ref}, which does not exist"
    # The README's deploy section moved to docs/deploy.md and is linked from the README.
    assert "](docs/deploy.md" in readme
    assert "### 3. Alternative: deploy with cargo lambda" not in readme


def test_cargo_lambda_path_waits_for_the_function_to_be_active_before_configuring_it():
    """update-function-configuration on a function still Pending (just created by cargo lambda
    deploy) fails with ResourceConflictException."""
    deploy = (ROOT / "docs/deploy.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", deploy, re.S)
    checked = 0
    for block in blocks:
        lines = [line.strip() for line in block.splitlines()]
        for i, line in enumerate(lines):
            if "update-function-configuration" in line:
                before = lines[:i]
                deploys = [j for j, b in enumerate(before) if b.startswith("cargo lambda deploy")]
                if not deploys:
                    continue
                checked += 1
                waits = [b for b in before[deploys[-1] :] if b.startswith("aws lambda wait function-active-v2")]
                assert waits, f"no `aws lambda wait function-active-v2` before: {line}"
    assert checked >= 1, "docs/deploy.md shows no cargo lambda deploy + update-function-configuration"


# issue #10, point 3 (template) --------------------------------------------------------------
KMS_KEY = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def kms_statements(rendered: dict) -> list:
    return [s for s in statements(role_of_function(rendered)) if any(str(a).startswith("kms:") for a in as_list(s["Action"]))]


def test_kms_decrypt_only_when_a_customer_managed_key_is_given_and_only_via_secrets_manager():
    assert kms_statements(render()) == []
    (s,) = kms_statements(render({"SecretsKmsKeyArn": KMS_KEY}))
    assert as_list(s["Action"]) == ["kms:Decrypt"]
    assert as_list(s["Resource"]) == [KMS_KEY]
    assert s["Condition"] == {"StringEquals": {"kms:ViaService": "secretsmanager.us-east-1.amazonaws.com"}}
    assert not cfn.parameter_accepts("SecretsKmsKeyArn", "arn:aws:kms:us-east-1:123456789012:alias/proxy")
    assert not cfn.parameter_accepts("SecretsKmsKeyArn", "*")


def test_secrets_ttl_reaches_the_function():
    assert function(render())["Environment"]["Variables"]["SECRETS_TTL_MS"] == "300000"
    env = function(render({"SecretsTtlMs": 60000}))["Environment"]["Variables"]
    assert env["SECRETS_TTL_MS"] == "60000"


# the deploy docs match the template -----------------------------------------------------------
def test_every_parameter_is_documented_with_its_environment_variable():
    template = cfn.load_template()
    deploy = (ROOT / "docs/deploy.md").read_text()
    readme = (ROOT / "README.md").read_text()
    configuration = (ROOT / "docs/configuration.md").read_text()
    env = template["Resources"]["ProxyFunction"]["Properties"]["Environment"]["Variables"]
    env_of = {v["Ref"]: k for k, v in env.items() if isinstance(v, dict) and "Ref" in v}
    rows = [line for line in deploy.splitlines() if line.startswith("| `")]
    for name in template["Parameters"]:
        assert f"`{name}`" in deploy, f"parameter {name} is not documented in docs/deploy.md"
        row = next((r for r in rows if f"`{name}`" in r.split("|")[1]), None)
        if row and name in env_of:
            assert f"`{env_of[name]}`" in row, f"docs/deploy.md's row for {name} does not name {env_of[name]}"
    # And the configuration tables (docs/configuration.md, the README's at-a-glance one) agree
    # with the template's defaults where both state one; every variable the template sets is in
    # docs/configuration.md's table.
    documented = [line.split("|")[1] for line in configuration.splitlines() if line.startswith("| `")]
    for name, var in env_of.items():
        default = str(template["Parameters"][name].get("Default", ""))
        assert any(f"`{var}`" in cell for cell in documented), f"{var} has no row in docs/configuration.md"
        for doc_name, doc in [("docs/configuration.md", configuration), ("README.md", readme)]:
            m = re.search(rf"^\| `{var}` \| `([^`]*)` \|", doc, re.M)
            if m and default:
                assert m.group(1) == default, f"{doc_name} says {var} defaults to {m.group(1)}, template {default}"


def code_number_settings() -> dict:
    """`VAR -> (default or None, min, max)` for every whole-number setting src/config.rs parses
    with `env.number(VAR, default, min, max)` / `env.optional_number(VAR, min, max)`."""
    src = cfn.rust_source("src/config.rs")
    consts = {
        name: value.replace("_", "")
        for name, value in re.findall(r"const ([A-Z_]+): u64 = ([\d_ *]+);", src)
    }
    consts.update({"deadline.margin_ms": "500", "deadline.fallback_timeout_ms": "30000"})

    def number(expr: str):
        expr = consts.get(expr.strip(), expr.strip()).replace("_", "")
        return eval(expr, {}, {}) if re.fullmatch(r"[\d *]+", expr) else None  # digits and * only

    out = {}
    for kind, var, args in re.findall(r"env\.(optional_number|number)\(\s*\"([A-Z_]+)\",(.*?)\)\?", src, re.S):
        values = [number(a) for a in args.split(",") if a.strip()]
        out[var] = (values[0], values[1], values[2]) if kind == "number" else (None, values[0], values[1])
    return out


def test_number_parameters_accept_only_what_the_function_accepts():
    """A value the template accepts but the config parser refuses would make every proxied
    request a 500 config_error: the bounds (and defaults) must agree."""
    template = cfn.load_template()
    env = template["Resources"]["ProxyFunction"]["Properties"]["Environment"]["Variables"]
    code = code_number_settings()
    assert {"SECRETS_TTL_MS", "RETRY_MAX_ATTEMPTS", "DEADLINE_MARGIN_MS"} <= set(code), code
    checked = 0
    for var, ref in env.items():
        param = template["Parameters"].get(ref.get("Ref", "") if isinstance(ref, dict) else "")
        if var not in code or not param or param["Type"] != "Number":
            continue
        default, low, high = code[var]
        assert "MinValue" in param and "MaxValue" in param, f"{var}: the template must bound it like the code ({low}..{high})"
        assert low is None or param["MinValue"] >= low, (var, param["MinValue"], low)
        assert high is None or param["MaxValue"] <= high, (var, param["MaxValue"], high)
        assert default is None or param["Default"] == default, (var, param["Default"], default)
        checked += 1
    assert checked >= 8, checked


def test_configuration_doc_states_the_codes_defaults_and_bounds():
    """docs/configuration.md's row of each whole-number setting gives the default src/config.rs
    uses, and any `(low … high)` it states is the code's."""
    table = (ROOT / "docs/configuration.md").read_text()
    rows = [line.split("|") for line in table.splitlines() if line.startswith("| `")]
    checked = 0
    for var, (default, low, high) in code_number_settings().items():
        row = next((r for r in rows if f"`{var}`" in r[1]), None)
        assert row, f"{var} has no row in docs/configuration.md"
        if default is not None:
            assert row[2].strip() == f"`{default}`", f"docs/configuration.md: {var} defaults to {row[2].strip()}, the code to {default}"
            checked += 1
        for a, b in re.findall(r"\((\d+) … (\d+)[);]", row[3]):
            assert (int(a), int(b)) == (low, high), f"docs/configuration.md: {var} is {a} … {b}, the code {low} … {high}"
    assert checked >= 10, checked
