"""template.yaml as CloudFormation will deploy it, for tests that check what a real
`sam build && sam deploy` creates (not only what lints clean).

- `load_template()`: the SAM template, read with cfn-lint's YAML loader (short-form tags such as
  `!Ref` become their `{"Ref": ...}` / `{"Fn::Sub": ...}` forms).
- `render(params)`: the template after the SAM transform (the real samtranslator, offline: the
  resources SAM generates, e.g. the HTTP API stage and the Lambda permissions, are there), with
  parameters (defaults overridden by `params`), pseudo parameters and conditions substituted.
  `Ref` / `Fn::GetAtt` / `${...}` of resources stay symbolic, so a test can see which resource a
  value points at.
- `parameter_accepts(name, value)`: whether CloudFormation would accept `value` for a parameter
  (AllowedPattern, AllowedValues, MinValue / MaxValue).
"""

from __future__ import annotations

import copy
import json
import os
import re
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"
SAMCONFIG = ROOT / "samconfig.toml"

# A plausible account for rendering; nothing is ever sent anywhere.
PSEUDO = {
    "AWS::Region": "us-east-1",
    "AWS::AccountId": "123456789012",
    "AWS::Partition": "aws",
    "AWS::URLSuffix": "amazonaws.com",
    "AWS::StackName": "openai-lambda-proxy",
    "AWS::StackId": "arn:aws:cloudformation:us-east-1:123456789012:stack/openai-lambda-proxy/1",
    "AWS::NotificationARNs": [],
}

# Complete secret ARNs (with the suffix Secrets Manager appends), as create-secret prints them.
OPENAI_SECRET = "arn:aws:secretsmanager:us-east-1:123456789012:secret:openai-proxy/openai-api-key-AbCdEf"
TOKENS_SECRET = "arn:aws:secretsmanager:us-east-1:123456789012:secret:openai-proxy/proxy-api-keys-GhIjKl"
REQUIRED = {"OpenAIApiKeySecretArn": OPENAI_SECRET, "ProxyApiKeysSecretArn": TOKENS_SECRET}


class _NoValue:
    """`AWS::NoValue`: the property or list item disappears."""


NO_VALUE = _NoValue()


def _plain(node):
    return json.loads(json.dumps(node))


@lru_cache(maxsize=None)
def _loaded() -> str:
    from cfnlint.decode import cfn_yaml

    return json.dumps(cfn_yaml.load(str(TEMPLATE)))


def load_template() -> dict:
    """The SAM template as plain dicts and lists (a fresh copy each call)."""
    return json.loads(_loaded())


def load_samconfig() -> dict:
    import tomllib  # Python >= 3.11

    with open(SAMCONFIG, "rb") as f:
        return tomllib.load(f)


def parameter_values(params: dict | None = None) -> dict:
    """Every parameter's value: its default, overridden by `params` (as strings, like CFN)."""
    values = {
        name: str(p["Default"])
        for name, p in load_template().get("Parameters", {}).items()
        if "Default" in p
    }
    unknown = set(params or {}) - set(load_template().get("Parameters", {}))
    assert not unknown, f"not parameters of template.yaml: {unknown}"
    values.update({k: str(v) for k, v in (params or {}).items()})
    # A CommaDelimitedList is a list of strings to the template ("" is [""]), as in CloudFormation.
    for name, p in load_template().get("Parameters", {}).items():
        if p.get("Type") == "CommaDelimitedList" and name in values:
            values[name] = [item.strip() for item in values[name].split(",")]
    return values


def parameter_accepts(name: str, value: str) -> bool:
    """Whether CloudFormation accepts `value` for parameter `name` (its constraints)."""
    p = load_template()["Parameters"][name]
    if "AllowedPattern" in p and re.fullmatch(p["AllowedPattern"], value) is None:
        return False
    if "AllowedValues" in p and value not in [str(v) for v in p["AllowedValues"]]:
        return False
    if p.get("Type") == "Number":
        try:
            number = float(value)
        except ValueError:
            return False
        if "MinValue" in p and number < float(p["MinValue"]):
            return False
        if "MaxValue" in p and number > float(p["MaxValue"]):
            return False
    return True


def sam_transform(template: dict, params: dict) -> dict:
    """The real SAM transform (samtranslator, as `sam deploy` runs it server-side), offline."""
    os.environ.setdefault("AWS_DEFAULT_REGION", PSEUDO["AWS::Region"])
    from samtranslator.translator.transform import transform

    class NoManagedPolicies:
        # The template names no managed policies; nothing is looked up in IAM.
        def load(self):
            return {}

    template = copy.deepcopy(template)
    for res in template["Resources"].values():
        props = res.get("Properties", {})
        # `sam build` / `sam package` replace the local CodeUri with the uploaded artifact.
        if res["Type"] == "AWS::Serverless::Function" and not str(props.get("CodeUri", "")).startswith("s3://"):
            props["CodeUri"] = "s3://sam-artifacts/openai-lambda-proxy/bootstrap.zip"
    return _plain(transform(template, params, NoManagedPolicies()))


class Renderer:
    def __init__(self, template: dict, values: dict):
        self.template = template
        self.values = values
        self.conditions: dict[str, bool] = {}

    def condition(self, name: str) -> bool:
        if name not in self.conditions:
            self.conditions[name] = bool(self.value(self.template["Conditions"][name]))
        return self.conditions[name]

    def ref(self, name: str, node: dict):
        if name == "AWS::NoValue":
            return NO_VALUE
        if name in PSEUDO:
            return PSEUDO[name]
        if name in self.values:
            return self.values[name]
        return node  # a resource: stays symbolic

    def sub(self, text: str, variables: dict) -> str:
        def one(m: re.Match) -> str:
            name = m.group(1)
            if name.startswith("!"):
                return "${" + name[1:] + "}"
            if name in variables:
                return str(self.value(variables[name]))
            value = self.ref(name, None)
            return m.group(0) if value is None else str(value)

        return re.sub(r"\$\{([^}]+)\}", one, text)

    def value(self, node):
        if isinstance(node, list):
            return [v for v in (self.value(x) for x in node) if v is not NO_VALUE]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            (key, arg), = node.items()
            if key == "Ref":
                return self.ref(arg, node)
            if key == "Condition":
                return self.condition(arg)
            if key == "Fn::If":
                return self.value(arg[1] if self.condition(arg[0]) else arg[2])
            if key == "Fn::Equals":
                return self.value(arg[0]) == self.value(arg[1])
            if key == "Fn::Not":
                return not self.value(arg[0])
            if key == "Fn::And":
                return all(self.value(a) for a in arg)
            if key == "Fn::Or":
                return any(self.value(a) for a in arg)
            if key == "Fn::Sub":
                text, variables = (arg, {}) if isinstance(arg, str) else arg
                return self.sub(text, variables)
            if key == "Fn::Join":
                parts = self.value(arg[1])
                if all(isinstance(p, str) for p in parts):
                    return arg[0].join(parts)
                return {key: [arg[0], parts]}
        out = {}
        for k, v in node.items():
            v = self.value(v)
            if v is not NO_VALUE:
                out[k] = v
        return out

    def render(self) -> dict:
        out = dict(self.template)
        out["Resources"] = {
            name: self.value({k: v for k, v in res.items() if k != "Condition"})
            for name, res in self.template["Resources"].items()
            if "Condition" not in res or self.condition(res["Condition"])
        }
        out["Outputs"] = {
            name: self.value(o)
            for name, o in self.template.get("Outputs", {}).items()
            if "Condition" not in o or self.condition(o["Condition"])
        }
        return out


def render(params: dict | None = None, *, with_required: bool = True) -> dict:
    """The deployed template for these parameter overrides (the two required secret ARNs are
    added unless `with_required` is false)."""
    overrides = {**(REQUIRED if with_required else {}), **(params or {})}
    values = parameter_values(overrides)
    transformed = sam_transform(load_template(), overrides)
    return Renderer(transformed, values).render()


def resources_of_type(rendered: dict, type_: str) -> dict:
    return {k: r for k, r in rendered["Resources"].items() if r["Type"] == type_}


def statements(role: dict) -> list[dict]:
    """Every statement of a role's inline policies."""
    out = []
    for policy in role["Properties"].get("Policies", []):
        stmts = policy["PolicyDocument"]["Statement"]
        out.extend(stmts if isinstance(stmts, list) else [stmts])
    return out


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def rust_source(path: str) -> str:
    return (ROOT / path).read_text()
