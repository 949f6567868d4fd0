"""Convert a UI-format ComfyUI workflow (what the browser saves and users drag in) into the API
format that /prompt takes, using the server's /object_info for each node's widget order."""

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Newer ComfyUI: a combo whose chosen option brings widgets of its own, sent as "parent.child".
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
SKIPPED_TYPES = {"Note", "MarkdownNote"}


def _spec(info: dict) -> list[tuple[str, list]]:
    declared = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    order = info.get("input_order", {})
    names = order.get("required", []) + order.get("optional", []) if order else list(declared)
    return [(name, declared[name]) for name in names]


def _is_widget(declared: list) -> bool:
    # An input of several types ("FLOAT,INT": LTX-2's frame_rate) names the widget it shows.
    kind = (declared[1] if len(declared) > 1 else {}).get("widgetType", declared[0])
    return isinstance(kind, list) or kind in WIDGET_TYPES or kind == DYNAMIC_COMBO


def _take_widgets(spec, values: list, inputs: dict, linked: set, prefix: str) -> None:
    """Assign widget values, in order, to the widget inputs of `spec` (and of chosen dynamic options)."""
    for name, declared in spec:
        if not _is_widget(declared):
            continue
        if not values:
            return
        value = values.pop(0)
        key = prefix + name
        if key not in linked:
            inputs[key] = value
        options = declared[1] if len(declared) > 1 else {}
        # The frontend adds "control after generate" where the input asks for it, and by default
        # after any integer named seed or noise_seed.
        control = options.get("control_after_generate")
        if control if control is not None else (declared[0] == "INT" and name in ("seed", "noise_seed")):
            values.pop(0)
        if declared[0] == DYNAMIC_COMBO:
            chosen = next((o for o in options.get("options", []) if o["key"] == value), None)
            if chosen is None:
                raise ValueError(f"{key}: '{value}' is not one of its options")
            nested = {**chosen["inputs"].get("required", {}), **chosen["inputs"].get("optional", {})}
            _take_widgets(list(nested.items()), values, inputs, linked, prefix=key + ".")


def to_api(workflow: dict, object_info: dict) -> dict:
    """API-format prompt of `workflow`. Raises ValueError naming the node for unknown node types
    and for widget values that do not fit the node's inputs."""
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in SKIPPED_TYPES:
            continue
        if node.get("mode", 0) != 0:
            raise ValueError(f"node {node['id']} ({kind}) is muted or bypassed; not supported here")
        if kind not in object_info:
            raise ValueError(f"node {node['id']}: unknown node type {kind}")
        inputs = {}
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        for i in node.get("inputs", []):
            if i.get("link") is not None:
                link = links[i["link"]]
                inputs[i["name"]] = [str(link[1]), link[2]]
        values = list(node.get("widgets_values", []))
        _take_widgets(_spec(object_info[kind]), values, inputs, linked, prefix="")
        if values:
            raise ValueError(f"node {node['id']} ({kind}): {len(values)} widget values left over: {values}")
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs}
    return prompt
