//! The Sandbox resource's spec: its network as the API's policy, its CRD schema.

use super::*;

fn spec(yaml: &str) -> SandboxSpec {
    serde_yaml::from_str(&format!("image: busybox\ncommand: [\"true\"]\n{yaml}")).unwrap()
}

#[test]
fn spec_network_maps_to_the_api_policy() {
    assert_eq!(
        spec("").network_policy().unwrap(),
        None,
        "unset: node default"
    );
    let s = spec(
        "network:\n  mode: allow\n  allow: [pypi.example, \"*.cdn.example:443\", 198.51.100.0/24]\n  deny: [bad.cdn.example]\n",
    );
    let api: NetworkPolicy = serde_json::from_value(serde_json::json!({
        "mode": "allow",
        "allow": ["pypi.example", "*.cdn.example:443", "198.51.100.0/24"],
        "deny": ["bad.cdn.example"],
    }))
    .unwrap();
    assert_eq!(s.network_policy().unwrap(), Some(api));
    assert_eq!(
        spec("network:\n  mode: open\n").network_policy().unwrap(),
        Some(NetworkPolicy::new(Mode::Open, vec![], vec![]).unwrap())
    );
    assert_eq!(
        spec("network: {}\n").network_policy().unwrap(),
        Some(NetworkPolicy::none()),
        "like the API, an empty network is mode none"
    );
    // It round-trips as written (the node agent reads what users wrote).
    let back: SandboxSpec = serde_yaml::from_str(&serde_yaml::to_string(&s).unwrap()).unwrap();
    assert_eq!(back, s);
}

#[test]
fn a_bad_spec_network_is_an_error_not_a_parse_failure() {
    // The object itself deserializes (one bad Sandbox must not break the watch of all)...
    let bad = spec("network:\n  mode: allow\n  allow: [\"exa mple.com\"]\n");
    // ...and the policy says what is wrong, by the API's rules.
    let err = bad.network_policy().unwrap_err().to_string();
    assert!(err.contains("exa mple.com"), "{err}");
    let none_with_allow = spec("network:\n  allow: [pypi.example]\n");
    assert_eq!(
        none_with_allow.network_policy().unwrap_err(),
        PolicyError::AllowWithModeNone
    );
}

#[test]
fn the_crd_schema_lists_the_modes_and_bounds_the_lists() {
    use kube::CustomResourceExt;
    let crd = serde_json::to_value(Sandbox::crd()).unwrap();
    let network = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ["properties"]["network"];
    assert_eq!(
        network["properties"]["mode"]["enum"],
        serde_json::json!(["none", "allow", "open"])
    );
    assert_eq!(network["properties"]["allow"]["maxItems"], MAX_ENTRIES);
    assert_eq!(
        network["properties"]["deny"]["items"]["maxLength"],
        MAX_ENTRY_LEN
    );
}
