//! The command line, run as a real process.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn cli(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_webhook-emitter"))
        .args(args)
        .env_remove("WH_CLI_TEST_KEY")
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
