#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed setup should stop the test
//! The command line, run as a real process.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn cli(args: &[&str], stdin: &[u8]) -> Output {
    cli_env(args, stdin, &[])
}

/// Runs the CLI with only `env` of the test variables set (BILLING_WEBHOOK_KEY and WH_CLI_TEST_KEY
/// are removed otherwise).
fn cli_env(args: &[&str], stdin: &[u8], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_webhook-emitter"));
    command
        .args(args)
        .env_remove("WH_CLI_TEST_KEY")
        .env_remove("BILLING_WEBHOOK_KEY");
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the CLI starts");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write stdin");
    child.wait_with_output().expect("the CLI finishes")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn write_temp(name: &str, contents: &str) -> String {
    let dir = std::env::temp_dir().join(format!("webhook-emitter-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write temp file");
    path.to_string_lossy().into_owned()
}

const VALID: &str = r#"{
  "events": [{"type": "job.completed", "objectType": "job",
              "match": {"methods": ["POST"], "path": "/jobs/{jobId}/complete", "status": [200]},
              "when": [{"pointer": "/status", "equals": "completed"}],
              "organisationId": {"header": "x-organisation-id"}}],
  "webhooks": [{"id": "66b2e3ddb97f60b5270d5ce9", "organisationId": "o1", "name": "Billing",
                "url": "https://billing.example.com/hooks", "status": "enabled",
                "events": ["job.completed"], "apiKey": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}],
  "delivery": {"cluster": "webhooks_egress"}
}"#;

#[test]
fn check_accepts_a_valid_configuration() {
    let path = write_temp("valid.json", VALID);
    let out = cli(&["check", &path], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("valid (1 event rules, 1 webhooks)"));
}

#[test]
fn check_prints_every_error_with_its_path() {
    let bad = VALID
        .replace("\"status\": \"enabled\"", "\"status\": \"paused\"")
        .replace("https://billing", "http://billing");
    let path = write_temp("bad.json", &bad);
    let out = cli(&["check", &path], b"");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("webhooks[0].status: must be \"enabled\" or \"disabled\""),
        "{err}"
    );
    assert!(
        err.contains("webhooks[0].url: must be an https URL"),
        "{err}"
    );
    assert!(err.contains("2 error(s)"), "{err}");
    assert!(!err.contains("MfKQ9r8GKYqr"), "the key leaked: {err}");
}

#[test]
fn check_reads_env_keys_from_the_environment() {
    let config = VALID.replace(
        "\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"",
        "{\"env\": \"WH_CLI_TEST_KEY\"}",
    );
    let path = write_temp("env.json", &config);
    let out = cli(&["check", &path], b"");
    assert!(text(&out.stderr)
        .contains("webhooks[0].apiKey: environment variable WH_CLI_TEST_KEY is not set"));
    let out = Command::new(env!("CARGO_BIN_EXE_webhook-emitter"))
        .args(["check", &path])
        .env("WH_CLI_TEST_KEY", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn keygen_prints_fresh_valid_keys() {
    let a = text(&cli(&["keygen"], b"").stdout).trim().to_string();
    let b = text(&cli(&["keygen"], b"").stdout).trim().to_string();
    assert_ne!(a, b);
    for key in [&a, &b] {
        assert!(
            webhook_emitter::signature::SigningKey::parse(key).is_ok(),
            "{key}"
        );
    }
    let short = text(&cli(&["keygen", "--bytes", "24"], b"").stdout)
        .trim()
        .to_string();
    assert_eq!(short.len(), "whsec_".len() + 32);
    assert!(!cli(&["keygen", "--bytes", "8"], b"").status.success());
}

#[test]
fn verify_checks_the_specification_example() {
    let args = [
        "verify",
        "--key",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "--id",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "--timestamp",
        "1614265330",
        "--signature",
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        "--tolerance",
        "0",
    ];
    let out = cli(&args, br#"{"test": 2432232314}"#);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "signature valid");
    let out = cli(&args, br#"{"test": 2432232315}"#);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("signature INVALID"));
    // The same delivery is stale under the default 5-minute tolerance.
    let out = cli(&args[..args.len() - 2], br#"{"test": 2432232314}"#);
    assert!(
        text(&out.stderr).contains("more than 300 s from now"),
        "{}",
        text(&out.stderr)
    );
}

// ---- conventions: --version, --help, exit codes -------------------------------------------------

const KEY: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn repo_file(path: &str) -> String {
    format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited, not killed")
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)))
}

#[test]
fn version_and_help_on_every_subcommand() {
    let out = cli(&["--version"], b"");
    assert_eq!(code(&out), 0);
    assert_eq!(
        text(&out.stdout).trim(),
        format!("webhook-emitter {}", env!("CARGO_PKG_VERSION"))
    );
    for sub in ["check", "keygen", "verify"] {
        let out = cli(&[sub, "--help"], b"");
        assert_eq!(code(&out), 0, "{sub} --help: {}", text(&out.stderr));
        assert!(
            text(&out.stdout).contains(&format!("Usage: webhook-emitter {sub}")),
            "{sub}: {}",
            text(&out.stdout)
        );
        let out = cli(&["help", sub], b"");
        assert_eq!(code(&out), 0);
        assert!(text(&out.stdout).contains(&format!("Usage: webhook-emitter {sub}")));
    }
    let out = cli(&["--help"], b"");
    assert_eq!(code(&out), 0);
    for sub in ["check", "keygen", "verify"] {
        assert!(text(&out.stdout).contains(sub));
    }
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &[][..],
        &["frobnicate"],
        &["check"],
        &["check", "a.json", "b.json"],
        &["check", "--format", "xml", "a.json"],
        &["check", "--no-such-option", "a.json"],
        &["keygen", "--bytes", "8"],
        &["keygen", "--bytes", "65"],
        &["keygen", "--bytes", "many"],
        &[
            "verify",
            "--id",
            "x",
            "--timestamp",
            "1",
            "--signature",
            "v1,x",
        ],
        &[
            "verify",
            "--key",
            KEY,
            "--key-env",
            "K",
            "--id",
            "x",
            "--timestamp",
            "1",
            "--signature",
            "v1,x",
        ],
        &[
            "verify",
            "--key",
            KEY,
            "--id",
            "x",
            "--timestamp",
            "yesterday",
            "--signature",
            "v1,x",
        ],
    ] {
        let out = cli(args, b"");
        assert_eq!(code(&out), 2, "{args:?}: {}", text(&out.stderr));
        // A usage error points to --help (with no subcommand, clap prints the help itself).
        assert!(
            text(&out.stderr).contains("--help"),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn invalid_input_exits_1() {
    let missing = cli(&["check", "/nonexistent/plugin.json"], b"");
    assert_eq!(code(&missing), 1);
    assert!(text(&missing.stderr).contains("/nonexistent/plugin.json"));
    let bad = cli(&["check", "-"], br#"{"events": []}"#);
    assert_eq!(code(&bad), 1);
    let not_json = cli(&["check", "-"], b"{\"events\": [\xff");
    assert_eq!(code(&not_json), 1);
    assert!(text(&not_json.stderr).contains("configuration: invalid JSON"));
    let not_utf8_yaml = cli(&["check", "-"], b"kind: \xff\xfe");
    assert_eq!(code(&not_utf8_yaml), 1);
    let bad_signature = cli(
        &[
            "verify",
            "--key",
            KEY,
            "--id",
            "x",
            "--timestamp",
            "1",
            "--tolerance",
            "0",
            "--signature",
            "v1,AAAA",
        ],
        b"{}",
    );
    assert_eq!(code(&bad_signature), 1);
}

#[test]
fn check_help_is_help_not_a_file_named_help() {
    let out = cli(&["check", "--help"], b"");
    assert_eq!(code(&out), 0);
    assert!(!text(&out.stderr).contains("No such file"));
}

#[test]
fn keygen_accepts_the_equals_form() {
    let out = cli(&["keygen", "--bytes=40"], b"");
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let key = text(&out.stdout).trim().to_string();
    // base64 of 40 bytes: 56 characters.
    assert_eq!(key.len(), "whsec_".len() + 56, "{key}");
    assert!(webhook_emitter::signature::SigningKey::parse(&key).is_ok());
}

#[test]
fn verify_reads_the_body_from_a_file() {
    let path = write_temp("body.json", r#"{"test": 2432232314}"#);
    let out = cli_env(
        &[
            "verify",
            "--key-env",
            "WH_CLI_TEST_KEY",
            "--id",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "--timestamp",
            "1614265330",
            "--tolerance",
            "0",
            "--signature",
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            "--body",
            &path,
        ],
        b"",
        &[("WH_CLI_TEST_KEY", KEY)],
    );
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "signature valid");
}

// ---- check: inputs ---------------------------------------------------------------------------

#[test]
fn check_reads_standard_input() {
    let out = cli(&["check", "-"], VALID.as_bytes());
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        "<stdin>: valid (1 event rules, 1 webhooks)"
    );
}

#[test]
fn check_format_json() {
    let out = cli(&["check", "--format", "json", "-"], VALID.as_bytes());
    assert_eq!(code(&out), 0);
    let report = json(&out);
    assert_eq!(report["valid"], true);
    assert_eq!(report["errors"], serde_json::json!([]));
    assert_eq!(report["configurations"][0]["eventRules"], 1);

    let bad = VALID.replace("\"status\": \"enabled\"", "\"status\": \"paused\"");
    let out = cli(&["check", "--format=json", "-"], bad.as_bytes());
    assert_eq!(code(&out), 1);
    let report = json(&out);
    assert_eq!(report["valid"], false);
    let errors = report["errors"].as_array().expect("errors");
    assert_eq!(errors.len(), 1, "{report}");
    assert_eq!(errors[0]["path"], "webhooks[0].status");
    let message = errors[0]["message"].as_str().expect("message");
    assert!(
        message.starts_with("must be \"enabled\" or \"disabled\""),
        "{message}"
    );
    assert!(text(&out.stderr).is_empty(), "{}", text(&out.stderr));

    let out = cli(&["check", "--format", "json", "/nonexistent.json"], b"");
    assert_eq!(code(&out), 1);
    assert_eq!(json(&out)["valid"], false);
}

#[test]
fn check_reads_a_plugin_configuration_written_in_yaml() {
    let yaml = "events:\n- {type: job.completed, objectType: job, match: {path: '/jobs/{jobId}/complete'},\n   organisationId: {header: x-organisation-id}}\nwebhooks:\n- {id: 66b2e3ddb97f60b5270d5ce9, organisationId: o1, name: B, url: 'https://b.example.com/h',\n   status: enabled, events: [job.completed], apiKey: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw}\ndelivery: {cluster: egress}\n";
    let out = cli(&["check", "-"], yaml.as_bytes());
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
}

#[test]
fn check_reads_the_shipped_wasmplugin_with_its_host_env() {
    let path = repo_file("envoy/istio/wasmplugin.yaml");
    // The WasmPlugin also pulls the registry with its proxy token (registry.tokenEnv).
    let env = [
        ("BILLING_WEBHOOK_KEY", KEY),
        ("REGISTRY_PROXY_TOKEN", "proxy-token"),
    ];
    let out = cli_env(&["check", &path], b"", &env);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(
        "WasmPlugin jobs/webhook-emitter: spec.pluginConfig: valid (1 event rules, 1 webhooks)"
    ));
    let out = cli_env(&["check", &path], b"", &env[1..]);
    assert_eq!(code(&out), 1);
    assert!(text(&out.stderr).contains(
        "spec.pluginConfig: webhooks[0].apiKey: environment variable BILLING_WEBHOOK_KEY is not set"
    ));
}

#[test]
fn check_reads_every_filter_of_the_shipped_envoy_configs() {
    for file in ["envoy/envoy.yaml", "envoy/compose/envoy.yaml"] {
        let out = cli_env(
            &["check", &repo_file(file)],
            b"",
            // The compose configuration also pulls the registry with its proxy token.
            &[
                ("BILLING_WEBHOOK_KEY", KEY),
                ("REGISTRY_PROXY_TOKEN", "proxy-token"),
            ],
        );
        assert_eq!(code(&out), 0, "{file}: {}", text(&out.stderr));
        assert!(
            // Inside the gate (an ExtensionWithMatcher around the wasm filter).
            text(&out.stdout).contains(
                "http_filters[0].typed_config.xds_matcher.matcher_list.matchers[0].on_match.action\
                 .typed_config.typed_config.typed_config.config.configuration: valid"
            ),
            "{file}: {}",
            text(&out.stdout)
        );
    }
}

/// An Envoy configuration with two emitter filters (one wrong) and an unrelated wasm filter.
fn two_filters(second_url: &str, second_env: &str) -> String {
    let filter = |name: &str, url: &str, env: &str| {
        let config = VALID
            .replace("https://billing.example.com/hooks", url)
            .replace(
                "\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"",
                &format!("{{\"env\": \"{env}\"}}"),
            );
        format!(
            r#"{{"name": "envoy.filters.http.wasm", "typed_config": {{
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": {{"name": "{name}", "root_id": "{name}",
                  "vm_config": {{"environment_variables": {{"host_env_keys": ["HOST_KEY"], "key_values": {{"INLINE_KEY": "{KEY}"}}}}}},
                  "configuration": {{"@type": "type.googleapis.com/google.protobuf.StringValue", "value": {config:?}}}}}}}}}"#
        )
    };
    format!(
        r#"{{"static_resources": {{"listeners": [{{"filter_chains": [{{"filters": [{{"typed_config": {{"http_filters": [{}, {}, {}]}}}}]}}]}}]}}}}"#,
        filter("webhook_emitter", "https://a.example.com/h", "HOST_KEY"),
        filter("someone_else", "not even a url", "X"),
        filter("webhook_emitter", second_url, second_env),
    )
}

#[test]
fn check_reads_each_emitter_filter_of_an_envoy_config_with_its_vm_environment() {
    let good = two_filters("https://b.example.com/h", "INLINE_KEY");
    let out = cli_env(&["check", "-"], good.as_bytes(), &[("HOST_KEY", KEY)]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).matches(": valid (").count(),
        2,
        "{}",
        text(&out.stdout)
    );

    // The second filter's URL is wrong, and its key comes from a variable the VM is not given,
    // although this process has it.
    let bad = two_filters("http://b.example.com/h", "NOT_FORWARDED");
    let out = cli_env(
        &["check", "--format", "json", "-"],
        bad.as_bytes(),
        &[("HOST_KEY", KEY), ("NOT_FORWARDED", KEY)],
    );
    assert_eq!(code(&out), 1);
    let report = json(&out);
    let configs = report["configurations"].as_array().expect("configurations");
    assert_eq!(
        configs.len(),
        2,
        "the other plugin's filter is not ours: {report}"
    );
    assert_eq!(configs[0]["valid"], true);
    assert_eq!(configs[1]["valid"], false);
    let source = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.http_filters[2].typed_config.config.configuration";
    assert_eq!(configs[1]["source"], source);
    let paths: Vec<&str> = report["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| {
            assert_eq!(e["source"], source);
            e["path"].as_str().expect("path")
        })
        .collect();
    assert_eq!(paths, ["webhooks[0].url", "webhooks[0].apiKey"], "{report}");
    assert_eq!(report["notGivenToVm"], serde_json::json!(["NOT_FORWARDED"]));
}

#[test]
fn check_allow_unset_env_accepts_keys_that_are_not_set_but_still_checks_the_rest() {
    let path = repo_file("envoy/envoy.yaml");
    let out = cli(&["check", "--allow-unset-env", &path], b"");
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("BILLING_WEBHOOK_KEY is not set here"));

    let out = cli(
        &["check", "--allow-unset-env", "--format", "json", "-"],
        two_filters("http://b.example.com/h", "HOST_KEY").as_bytes(),
    );
    assert_eq!(code(&out), 1);
    let report = json(&out);
    assert_eq!(report["unsetEnv"], serde_json::json!(["HOST_KEY"]));
    assert_eq!(
        report["errors"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
    assert_eq!(report["errors"][0]["path"], "webhooks[0].url");

    // A variable that is set but holds a bad key is still refused.
    let out = cli_env(
        &["check", "--allow-unset-env", &path],
        b"",
        &[("BILLING_WEBHOOK_KEY", "whsec_short")],
    );
    assert_eq!(code(&out), 1);
    assert!(text(&out.stderr).contains("webhooks[0].apiKey"));
    assert!(!text(&out.stderr).contains("whsec_short"), "the key leaked");
}

#[test]
fn check_refuses_a_file_with_no_emitter_configuration() {
    let out = cli(&["check", "-"], b"static_resources:\n  listeners: []\n");
    assert_eq!(code(&out), 1);
    assert!(
        text(&out.stderr).contains("no webhook_emitter configuration found"),
        "{}",
        text(&out.stderr)
    );
    let out = cli(
        &[
            "check",
            "--plugin-name",
            "other",
            &repo_file("envoy/istio/wasmplugin.yaml"),
        ],
        b"",
    );
    assert_eq!(code(&out), 1);
    assert!(text(&out.stderr).contains("no other configuration found"));
}

#[test]
fn check_reads_the_wasmplugins_of_a_kubectl_list() {
    let plugin = std::fs::read_to_string(repo_file("envoy/istio/wasmplugin.yaml")).expect("read");
    let indented: String = plugin
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("  {l}\n"))
        .collect();
    let list = format!(
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: ConfigMap\n  metadata: {{name: other}}\n-\n{indented}"
    );
    let out = cli_env(
        &["check", "-"],
        list.as_bytes(),
        &[
            ("BILLING_WEBHOOK_KEY", KEY),
            ("REGISTRY_PROXY_TOKEN", "proxy-token"),
        ],
    );
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert!(
        text(&out.stdout)
            .contains("items[1]: WasmPlugin jobs/webhook-emitter: spec.pluginConfig: valid"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn envoy_matcher_prints_the_gate_of_the_rules() {
    let out = cli(
        &["envoy-matcher", "--format", "json", "-"],
        VALID.as_bytes(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let rules = webhook_emitter::config::Plan::rules_from_json(VALID.as_bytes()).expect("valid");
    assert_eq!(printed, webhook_emitter::gate::predicate(&rules));
    // YAML by default, for pasting into an Envoy configuration.
    let yaml = cli(&["envoy-matcher", "-"], VALID.as_bytes());
    assert!(yaml.status.success());
    assert!(
        text(&yaml.stdout)
            .contains(r"regex: (?s)(?:/+jobs/+\C+/+complete/*(?:[?#]\C*)?|[^?#]*(?:%|;|/\.)\C*)"),
        "{}",
        text(&yaml.stdout)
    );
    // An env key that is not set does not matter to the gate.
    let env_key = VALID.replace(
        r#""whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw""#,
        r#"{"env": "WH_CLI_TEST_KEY"}"#,
    );
    assert!(cli(&["envoy-matcher", "-"], env_key.as_bytes())
        .status
        .success());
}

#[test]
fn envoy_matcher_refuses_bad_rules_with_their_path() {
    let bad = VALID.replace("/jobs/{jobId}/complete", "jobs");
    let out = cli(&["envoy-matcher", "-"], bad.as_bytes());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("events[0].match.path"),
        "{}",
        text(&out.stderr)
    );
}
