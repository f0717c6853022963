//! No credential reaches any output channel: the service's stdout and stderr (with
//! SHOW_BUILD_LOGS and DEBUG on), build logs, responses, metrics, callbacks, and the state
//! left on disk once builds end.

mod common;

use common::bin::*;
use common::*;
use serde_json::json;
use std::process::Stdio;
use std::time::Duration;

const BUILD: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_any_output() {
    require_services();
    let data = tempfile::tempdir().unwrap();
    let out_path = data.path().join("stdout");
    let err_path = data.path().join("stderr");
    let extra = format!(
        r#"{{"{AUTH_REGISTRY}": {{"username": "{AUTH_USER}", "password": "{AUTH_PASS}"}}}}"#
    );
    let p = spawn_with_output(
        &data.path().join("data"),
        free_port(),
        &[
            ("SHOW_BUILD_LOGS", "true"),
            ("DEBUG", "buildshuttle:*"),
            ("EXTRA_DOCKER_REGISTRY_CONFIG", &extra),
            ("CALLBACK_RETRY_SECONDS", "2"),
        ],
        Stdio::from(std::fs::File::create(&out_path).unwrap()),
        Stdio::from(std::fs::File::create(&err_path).unwrap()),
    );
    let cb = Callbacks::start().await;
    let wrong = "wrong-pw-9f8e7d6c";
    let cb_token = "cb-token-5a4b3c2d";
    let docker_pw = "docker-pw-1a2b3c";
    // Build args carry the app's config vars (tokens, database URLs).
    let npm_token = "npm-tok-7h6g5f";
    let df = format!(
        "FROM {AUTH_REGISTRY}/base/busybox:1\n{}\nRUN echo SECRETS-BUILD\n",
        cache_buster()
    );
    let archive = data_uri(&tar_gz(&[("Dockerfile", df.as_bytes())]));

    // Success with registry auth; failure with a wrong password; docker:// with URL
    // credentials; docker:// with docker_password (wrong, so it fails and says so).
    let mut ok = body(&archive, &cb);
    ok["gm_registry_host"] = json!(AUTH_REGISTRY);
    ok["gm_registry_auth"] = json!({"username": AUTH_USER, "password": AUTH_PASS});
    ok["callback_auth"] = json!(cb_token);
    ok["build_args"] = json!({"NPM_TOKEN": npm_token});
    let mut bad = body(&archive, &cb);
    bad["gm_registry_host"] = json!(AUTH_REGISTRY);
    bad["gm_registry_auth"] = json!({"username": AUTH_USER, "password": wrong});
    bad["callback_auth"] = json!(cb_token);
    let url_creds = body(
        &format!("docker://{AUTH_USER}:{AUTH_PASS}@{AUTH_REGISTRY}/base/busybox:1"),
        &cb,
    );
    let mut login = body(&format!("docker://{AUTH_REGISTRY}/base/busybox:1"), &cb);
    login["docker_login"] = json!(AUTH_USER);
    login["docker_password"] = json!(docker_pw);
    // A callback that is down: its failure is logged, without the token.
    let mut down = body(&format!("docker://{REGISTRY}/base/busybox:1"), &cb);
    down["callback"] = json!(format!(
        "http://127.0.0.1:{}/cb?token={cb_token}",
        free_port()
    ));
    down["callback_auth"] = json!(cb_token);
    for b in [&ok, &bad, &url_creds, &login, &down] {
        p.post(b).await;
    }
    let mut responses = String::new();
    // A rejected request that carries secrets: the answer does not echo them.
    let mut rejected = ok.clone();
    rejected["build_uuid"] = json!("nope");
    let r = reqwest::Client::new()
        .post(p.url("/"))
        .json(&rejected)
        .send()
        .await
        .unwrap();
    responses.push_str(&r.text().await.unwrap());

    assert_eq!(
        cb.wait_final(ok["build_uuid"].as_str().unwrap(), BUILD)
            .await,
        "succeeded",
        "{}",
        p.log(&ok).await
    );
    assert_eq!(
        cb.wait_final(bad["build_uuid"].as_str().unwrap(), BUILD)
            .await,
        "failed"
    );
    assert_eq!(
        cb.wait_final(url_creds["build_uuid"].as_str().unwrap(), BUILD)
            .await,
        "succeeded",
        "{}",
        p.log(&url_creds).await
    );
    assert_eq!(
        cb.wait_final(login["build_uuid"].as_str().unwrap(), BUILD)
            .await,
        "failed"
    );
    p.wait_log(&down, "Build finished").await;
    tokio::time::sleep(Duration::from_secs(5)).await; // the down callback gives up after 2 s

    for b in [&ok, &bad, &url_creds, &login, &down] {
        responses.push_str(&p.log(b).await);
        for c in cb.calls_for(b["build_uuid"].as_str().unwrap()) {
            responses.push_str(&c.raw);
        }
    }
    responses.push_str(
        &reqwest::get(p.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    let stdout = std::fs::read_to_string(&out_path).unwrap();
    let stderr = std::fs::read_to_string(&err_path).unwrap();
    assert!(
        stdout.contains("SECRETS-BUILD"),
        "SHOW_BUILD_LOGS prints build output"
    );
    assert!(stderr.contains("callback not delivered"), "{stderr}");
    let mut state = String::new();
    for f in std::fs::read_dir(data.path().join("data/state"))
        .unwrap()
        .flatten()
    {
        state.push_str(&std::fs::read_to_string(f.path()).unwrap_or_default());
    }
    for (name, text) in [
        ("responses and logs", &responses),
        ("stdout", &stdout),
        ("stderr", &stderr),
        ("state", &state),
    ] {
        for secret in [AUTH_PASS, wrong, cb_token, docker_pw, npm_token] {
            assert!(
                !text.contains(secret),
                "{secret} leaked into {name}:\n{text}"
            );
        }
    }
}
