//! Where the keys come from when they are not in `AWS_ACCESS_KEY_ID`: a profile of the
//! shared files, a `credential_process` (renewed before its keys expire), the container
//! endpoint with its token, the instance role through IMDSv2, a web identity through STS.
//! The endpoints are played by [`Responder`], a tiny HTTP server that records what it is
//! asked.

use std::io::Write;

use super::get;
use crate::common::fixtures::walsync;
use walsync::storage::s3::{S3Config, S3Storage};
use walsync::storage::Storage;
use walsync::ErrorKind;
use walsync_testkit::s3server::S3Server;

/// One request a [`Responder`] received.
#[derive(Debug, Clone)]
struct Received {
    method: String,
    path: String,
    /// Header names lowercased.
    headers: Vec<(String, String)>,
    body: String,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A tiny HTTP server on 127.0.0.1 standing in for a credentials endpoint (ECS, IMDS, STS):
/// `answer` gives the status and body of each request, and every request is recorded.
struct Responder {
    addr: std::net::SocketAddr,
    received: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
}

impl Responder {
    fn start(answer: impl Fn(&Received) -> (u16, String) + Send + 'static) -> Responder {
        use std::io::{BufRead, BufReader, Read};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = std::sync::Arc::clone(&received);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let mut parts = line.split_whitespace();
                let method = parts.next().unwrap_or_default().to_string();
                let path = parts.next().unwrap_or_default().to_string();
                let mut headers = Vec::new();
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
                        break;
                    }
                    if let Some((name, value)) = header.split_once(':') {
                        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
                    }
                }
                let length: usize = headers
                    .iter()
                    .find(|(n, _)| n == "content-length")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0; length];
                let _ = reader.read_exact(&mut body);
                let request = Received {
                    method,
                    path,
                    headers,
                    body: String::from_utf8_lossy(&body).to_string(),
                };
                let (status, body) = answer(&request);
                log.lock().unwrap().push(request);
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Responder { addr, received }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

/// The test server's keys as a credentials endpoint answers them (JSON), expiring `in_secs`
/// from now.
fn keys_json(server: &S3Server, token_name: &str, in_secs: i64) -> String {
    let expires = walsync::UtcTime::from_millis(walsync::UtcTime::now().millis() + in_secs * 1000);
    format!(
        "{{\"Version\": 1, \"AccessKeyId\": \"{}\", \"SecretAccessKey\": \"{}\", \
         \"{token_name}\": \"session-token-from-the-source\", \"Expiration\": \"{}\"}}",
        server.access_key(),
        server.secret_key(),
        expires.to_rfc3339()
    )
}

/// The environment of a walsync child that must find its keys elsewhere than in
/// AWS_ACCESS_KEY_ID: the server's endpoint and region, a HOME without `.aws`.
fn env_without_keys(server: &S3Server, home: &std::path::Path) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = server
        .env()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("AWS_ACCESS") && !k.starts_with("AWS_SECRET"))
        .collect();
    env.push(("HOME".into(), home.display().to_string()));
    env.push(("AWS_EC2_METADATA_DISABLED".into(), "true".into()));
    env
}

#[test]
fn keys_from_a_profile_of_the_shared_files() {
    let server = S3Server::start();
    server
        .storage("profile")
        .put_bytes("app/state.json", b"{}")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(home.join(".aws")).unwrap();
    std::fs::write(
        home.join(".aws/credentials"),
        format!(
            "[default]\naws_access_key_id = nobody\naws_secret_access_key = wrong\n\n\
             [backup]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            server.access_key(),
            server.secret_key()
        ),
    )
    .unwrap();
    let dest = format!("s3://{}/profile", server.bucket());
    let mut env = env_without_keys(&server, &home);
    env.push(("AWS_PROFILE".into(), "backup".into()));
    let out = walsync(&["list", "-b", &dest], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // One line says where the keys came from, never what they are.
    let from: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("S3 credentials from"))
        .collect();
    assert_eq!(from.len(), 1, "{stderr}");
    assert!(
        from[0].ends_with(&format!(
            "S3 credentials from profile \"backup\" in {}",
            home.join(".aws/credentials").display()
        )),
        "{stderr}"
    );
    assert!(!stderr.contains(server.secret_key()), "{stderr}");
    // The default profile's keys are refused, by the store.
    let env = env_without_keys(&server, &home);
    let out = walsync(&["list", "-b", &dest], &env);
    assert_eq!(out.status.code(), Some(5));
}

#[test]
fn keys_from_credential_process_are_renewed_before_they_expire() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let answer = dir.path().join("answer.json");
    let command = format!(
        "echo run >> '{}'; cat '{}'",
        runs.display(),
        answer.display()
    );
    let runs_count = || {
        std::fs::read_to_string(&runs)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    let storage = |valid_secs: i64| {
        std::fs::write(&answer, keys_json(&server, "SessionToken", valid_secs)).unwrap();
        S3Storage::new(S3Config {
            access_key: String::new(),
            secret_key: String::new(),
            credential_source: Some(walsync::storage::credentials::Source::Process {
                profile: "test".into(),
                command: command.clone(),
            }),
            credential_origin: "the credential_process of profile \"test\"".into(),
            ..server.config("process")
        })
        .unwrap()
    };
    // Valid for an hour: asked once, at the first request (not when the storage is made).
    let s3 = storage(3600);
    assert_eq!(runs_count(), 0);
    s3.put_bytes("a", b"1").unwrap();
    s3.put_bytes("b", b"2").unwrap();
    assert_eq!(get(&s3, "a").unwrap(), b"1");
    assert_eq!(runs_count(), 1);
    // The session token is sent, as a signed header.
    let last = server.requests().pop().unwrap();
    assert!(
        last.authorization.unwrap().contains("x-amz-security-token"),
        "no token signed"
    );
    // Expiring within five minutes: asked again before each request.
    std::fs::remove_file(&runs).unwrap();
    let s3 = storage(120);
    for key in ["c", "d", "e"] {
        s3.put_bytes(key, b"x").unwrap();
    }
    assert_eq!(runs_count(), 3);
    // Keys the store says have expired before their time are fetched again, at once.
    std::fs::remove_file(&runs).unwrap();
    let s3 = storage(3600);
    s3.put_bytes("f", b"x").unwrap();
    server.fail_next_request(400, "ExpiredToken", "The provided token has expired.");
    s3.put_bytes("g", b"x").unwrap();
    assert_eq!(runs_count(), 2);
    assert_eq!(get(&s3, "g").unwrap(), b"x");
    // A process that fails at the first request: an auth error naming the source.
    let s3 = storage(3600);
    std::fs::write(&answer, "not json").unwrap();
    let err = s3.put_bytes("f", b"x").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(
        err.to_string().starts_with(&format!(
            "s3://{}/process: PUT f: no S3 credentials from the credential_process of profile \
             \"test\": its output is not JSON",
            server.bucket()
        )),
        "{err}"
    );
}

#[test]
fn keys_from_a_container_endpoint_with_its_authorization_token() {
    let server = S3Server::start();
    server
        .storage("ecs")
        .put_bytes("app/state.json", b"{}")
        .unwrap();
    let json = keys_json(&server, "Token", 6 * 3600);
    let endpoint = Responder::start(
        move |r| match (r.path.as_str(), r.header("authorization")) {
            ("/v2/credentials", Some("pod-identity-token")) => (200, json.clone()),
            _ => (403, String::new()),
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "pod-identity-token\n").unwrap();
    let mut env = env_without_keys(&server, dir.path());
    env.push((
        "AWS_CONTAINER_CREDENTIALS_FULL_URI".into(),
        endpoint.url("/v2/credentials"),
    ));
    env.push((
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE".into(),
        token_file.display().to_string(),
    ));
    let dest = format!("s3://{}/ecs", server.bucket());
    let out = walsync(&["list", "-b", &dest], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "S3 credentials from the container credentials endpoint {}",
            endpoint.url("/v2/credentials")
        )),
        "{stderr}"
    );
    assert_eq!(endpoint.received().len(), 1);
}

#[test]
fn keys_from_the_instance_role_through_imdsv2() {
    let server = S3Server::start();
    server
        .storage("imds")
        .put_bytes("app/state.json", b"{}")
        .unwrap();
    let json = keys_json(&server, "Token", 6 * 3600);
    let imds = Responder::start(move |r| {
        let token = r.header("x-aws-ec2-metadata-token");
        match (r.method.as_str(), r.path.as_str(), token) {
            ("PUT", "/latest/api/token", None)
                if r.header("x-aws-ec2-metadata-token-ttl-seconds").is_some() =>
            {
                (200, "imds-session".into())
            }
            ("GET", "/latest/meta-data/iam/security-credentials/", Some("imds-session")) => {
                (200, "backup-role\n".into())
            }
            (
                "GET",
                "/latest/meta-data/iam/security-credentials/backup-role",
                Some("imds-session"),
            ) => (200, json.clone()),
            // IMDSv1 (no session token) is refused, as on instances that require v2.
            _ => (401, String::new()),
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let mut env: Vec<(String, String)> = env_without_keys(&server, dir.path())
        .into_iter()
        .filter(|(k, _)| k != "AWS_EC2_METADATA_DISABLED")
        .collect();
    env.push(("AWS_EC2_METADATA_SERVICE_ENDPOINT".into(), imds.url("")));
    let dest = format!("s3://{}/imds", server.bucket());
    let out = walsync(&["list", "-b", &dest], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let paths: Vec<String> = imds
        .received()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(
        paths,
        [
            "PUT /latest/api/token",
            "GET /latest/meta-data/iam/security-credentials/",
            "GET /latest/meta-data/iam/security-credentials/backup-role"
        ]
    );
}

#[test]
fn keys_from_web_identity_through_sts() {
    let server = S3Server::start();
    server
        .storage("irsa")
        .put_bytes("app/state.json", b"{}")
        .unwrap();
    let expires = walsync::UtcTime::from_millis(walsync::UtcTime::now().millis() + 3_600_000);
    let xml = format!(
        "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
         <AssumeRoleWithWebIdentityResult><Credentials><AccessKeyId>{}</AccessKeyId>\
         <SecretAccessKey>{}</SecretAccessKey><SessionToken>sts-token</SessionToken>\
         <Expiration>{}</Expiration></Credentials></AssumeRoleWithWebIdentityResult>\
         </AssumeRoleWithWebIdentityResponse>",
        server.access_key(),
        server.secret_key(),
        expires.to_rfc3339()
    );
    let sts = Responder::start(move |r| {
        let form_ok = r.body.contains("Action=AssumeRoleWithWebIdentity")
            && r.body
                .contains("RoleArn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fbackup")
            && r.body.contains("WebIdentityToken=eyJ.jwt.token");
        if r.method == "POST" && form_ok {
            (200, xml.clone())
        } else {
            (
                400,
                "<ErrorResponse><Error><Code>InvalidIdentityToken</Code></Error></ErrorResponse>"
                    .into(),
            )
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "eyJ.jwt.token\n").unwrap();
    let mut env = env_without_keys(&server, dir.path());
    env.extend([
        (
            "AWS_WEB_IDENTITY_TOKEN_FILE".to_string(),
            token_file.display().to_string(),
        ),
        (
            "AWS_ROLE_ARN".to_string(),
            "arn:aws:iam::123456789012:role/backup".to_string(),
        ),
        ("AWS_ENDPOINT_URL_STS".to_string(), sts.url("/")),
    ]);
    let dest = format!("s3://{}/irsa", server.bucket());
    let out = walsync(&["list", "-b", &dest], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(sts.received().len(), 1);
    assert!(!stderr.contains("eyJ.jwt.token"), "{stderr}");
}
