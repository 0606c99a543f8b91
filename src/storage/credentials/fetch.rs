//! Asking a [`Source`] for keys: running a `credential_process`, STS
//! AssumeRoleWithWebIdentity, the container credentials endpoint, or IMDSv2.
//!
//! The chain in the parent module only decides where keys come from, reading variables and
//! files; everything that runs a command or asks a server is here, behind
//! [`Source::fetch`], which [`S3Storage`](crate::storage::s3::S3Storage) calls at its first
//! request and again before the keys expire. Each source answers with JSON or STS's XML,
//! read into [`Fetched`]. Requests are short (a few seconds at most, a second to connect to
//! IMDS, which does not answer at all off EC2), and the link-local endpoints are asked
//! without any proxy. Errors name the source and what failed, never a secret.

use std::path::Path;
use std::time::Duration;

use super::{Fetched, Source};
use crate::error::{Error, ErrorKind, Result};
use crate::storage::xml;
use crate::utc::UtcTime;

/// How long one request for credentials may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// IMDS answers at once on EC2; elsewhere its address does not answer at all.
const IMDS_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

impl Source {
    /// Ask for keys. Errors name the source and what failed, never a secret.
    pub fn fetch(&self) -> Result<Fetched> {
        let result = match self {
            Source::Process { command, .. } => run_process(command),
            Source::WebIdentity {
                token_file,
                role_arn,
                session_name,
                sts,
            } => assume_role_with_web_identity(token_file, role_arn, session_name, sts),
            Source::Container {
                url,
                token,
                token_file,
            } => container(url, token.as_deref(), token_file.as_deref()),
            Source::Imds { endpoint } => imds(endpoint),
        };
        result.map_err(|why| {
            let message = match self {
                // The end of the chain: say what else was looked for.
                Source::Imds { .. } => format!(
                    "no S3 credentials: none in the environment (AWS_ACCESS_KEY_ID and \
                     AWS_SECRET_ACCESS_KEY), in a profile of the shared files (AWS_PROFILE, \
                     ~/.aws/credentials, ~/.aws/config), from web identity or a container \
                     endpoint, and none from {}: {why}",
                    self.describe()
                ),
                _ => format!("no S3 credentials from {}: {why}", self.describe()),
            };
            Error::new(ErrorKind::Auth, message)
        })
    }

    pub fn describe(&self) -> String {
        match self {
            Source::Process { profile, .. } => {
                format!("the credential_process of profile {profile:?}")
            }
            Source::WebIdentity { role_arn, sts, .. } => {
                format!("web identity (role {role_arn}, STS {sts})")
            }
            Source::Container { url, .. } => format!("the container credentials endpoint {url}"),
            Source::Imds { endpoint } => format!("the EC2 instance role (IMDSv2 at {endpoint})"),
        }
    }
}

/// Keys from a JSON document with `AccessKeyId`, `SecretAccessKey`, a token under `token`
/// (`SessionToken` or `Token`) and an optional `Expiration`.
fn from_json(text: &str, token: &str) -> std::result::Result<Fetched, String> {
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("the answer is not JSON ({e})"))?;
    let field = |name: &str| {
        json.get(name)
            .and_then(|v| v.as_str())
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    let (Some(key), Some(secret)) = (field("AccessKeyId"), field("SecretAccessKey")) else {
        return Err("the answer has no AccessKeyId and SecretAccessKey".to_string());
    };
    let expires = match field("Expiration") {
        Some(text) => Some(
            UtcTime::parse_rfc3339(&text).map_err(|_| format!("unreadable Expiration {text:?}"))?,
        ),
        None => None,
    };
    Ok(Fetched {
        key,
        secret,
        token: field(token),
        expires,
    })
}

fn run_process(command: &str) -> std::result::Result<Fetched, String> {
    let output = std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run it: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().last().unwrap_or_default().trim();
        return Err(format!("it failed ({}): {last}", output.status));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let version = serde_json::from_str::<serde_json::Value>(&stdout)
        .ok()
        .and_then(|json| json.get("Version")?.as_u64());
    if version != Some(1) {
        return Err("its output is not JSON with \"Version\": 1".to_string());
    }
    from_json(&stdout, "SessionToken")
}

/// An HTTP client for one source. `direct`: no proxy (HTTPS_PROXY and the like), for the
/// link-local metadata and container endpoints that only this host reaches.
fn agent(connect: Duration, direct: bool) -> ureq::Agent {
    let builder = ureq::Agent::config_builder();
    let builder = if direct { builder.proxy(None) } else { builder };
    builder
        .http_status_as_error(false)
        .timeout_connect(Some(connect))
        .timeout_global(Some(FETCH_TIMEOUT))
        .max_redirects(0)
        .user_agent(concat!("walsync/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

/// The body of a successful answer, or why there is none.
fn body(
    result: std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    what: &str,
) -> std::result::Result<String, String> {
    let response = result.map_err(|e| format!("{what}: {e}"))?;
    let status = response.status().as_u16();
    let text = response
        .into_body()
        .into_with_config()
        .limit(64 * 1024)
        .read_to_string()
        .map_err(|e| format!("{what}: {e}"))?;
    if !(200..300).contains(&status) {
        return Err(format!("{what}: HTTP {status}"));
    }
    Ok(text)
}

fn container(
    url: &str,
    token: Option<&str>,
    token_file: Option<&Path>,
) -> std::result::Result<Fetched, String> {
    let token = match token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?
                .trim()
                .to_string(),
        ),
        None => token.map(str::to_string),
    };
    let mut request = agent(FETCH_TIMEOUT, true).get(url);
    if let Some(token) = &token {
        request = request.header("authorization", token.as_str());
    }
    let text = body(request.call(), "GET")?;
    from_json(&text, "Token")
}

fn imds(endpoint: &str) -> std::result::Result<Fetched, String> {
    let agent = agent(IMDS_CONNECT_TIMEOUT, true);
    let token = body(
        agent
            .put(format!("{endpoint}/latest/api/token"))
            .header("x-aws-ec2-metadata-token-ttl-seconds", "21600")
            .send_empty(),
        "session token",
    )?;
    let base = format!("{endpoint}/latest/meta-data/iam/security-credentials/");
    let roles = body(
        agent
            .get(&base)
            .header("x-aws-ec2-metadata-token", token.as_str())
            .call(),
        "role name",
    )?;
    let role = roles.lines().next().unwrap_or_default().trim();
    if role.is_empty() || role.contains(['/', '?', '#']) {
        return Err("no instance role".to_string());
    }
    let text = body(
        agent
            .get(format!("{base}{role}"))
            .header("x-aws-ec2-metadata-token", token.as_str())
            .call(),
        "role credentials",
    )?;
    from_json(&text, "Token")
}

fn assume_role_with_web_identity(
    token_file: &Path,
    role_arn: &str,
    session_name: &str,
    sts: &str,
) -> std::result::Result<Fetched, String> {
    let token = std::fs::read_to_string(token_file)
        .map_err(|e| format!("reading {}: {e}", token_file.display()))?;
    let form = [
        ("Action", "AssumeRoleWithWebIdentity"),
        ("Version", "2011-06-15"),
        ("RoleArn", role_arn),
        ("RoleSessionName", session_name),
        ("WebIdentityToken", token.trim()),
    ];
    let mut encoded = String::new();
    for (name, value) in form {
        if !encoded.is_empty() {
            encoded.push('&');
        }
        encoded.push_str(name);
        encoded.push('=');
        // Everything but RFC 3986's unreserved characters.
        const FORM: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
            .remove(b'-')
            .remove(b'.')
            .remove(b'_')
            .remove(b'~');
        encoded.extend(percent_encoding::utf8_percent_encode(value, FORM));
    }
    let response = agent(FETCH_TIMEOUT, false)
        .post(sts)
        .header("content-type", "application/x-www-form-urlencoded")
        .send(encoded.as_bytes());
    let text = match response {
        Ok(response) if !response.status().is_success() => {
            let status = response.status().as_u16();
            let text = response
                .into_body()
                .into_with_config()
                .limit(64 * 1024)
                .read_to_string()
                .unwrap_or_default();
            let code = xml::text(&text, "Code").ok().flatten();
            let message = xml::text(&text, "Message").ok().flatten();
            return Err(format!(
                "HTTP {status} {}: {}",
                code.unwrap_or_default(),
                message.unwrap_or_default()
            ));
        }
        other => body(other, "AssumeRoleWithWebIdentity")?,
    };
    let content = xml::expect_root(&text, "AssumeRoleWithWebIdentityResponse")?;
    let credentials = xml::elements(content, "Credentials")
        .next()
        .ok_or("no <Credentials> in STS's answer")??;
    let expiration = xml::required(credentials, "Expiration")?;
    Ok(Fetched {
        key: xml::required(credentials, "AccessKeyId")?,
        secret: xml::required(credentials, "SecretAccessKey")?,
        token: xml::text(credentials, "SessionToken")?,
        expires: Some(
            UtcTime::parse_rfc3339(&expiration)
                .map_err(|_| format!("unreadable Expiration {expiration:?}"))?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_process_output_and_failures() {
        let source = |command: &str| Source::Process {
            profile: "p".into(),
            command: command.into(),
        };
        let keys = source(
            "printf '%s' '{\"Version\": 1, \"AccessKeyId\": \"AK\", \"SecretAccessKey\": \"SK\", \
             \"SessionToken\": \"ST\", \"Expiration\": \"2030-01-02T03:04:05Z\"}'",
        )
        .fetch()
        .unwrap();
        assert_eq!(
            (
                keys.key.as_str(),
                keys.secret.as_str(),
                keys.token.as_deref()
            ),
            ("AK", "SK", Some("ST"))
        );
        assert_eq!(
            keys.expires.unwrap().to_rfc3339(),
            "2030-01-02T03:04:05.000Z"
        );
        assert!(!format!("{keys:?}").contains("SK"));
        let err = source("echo nope >&2; exit 3").fetch().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Auth);
        assert_eq!(
            err.to_string(),
            "no S3 credentials from the credential_process of profile \"p\": it failed \
             (exit status: 3): nope"
        );
        let err = source("echo '{\"Version\": 2}'").fetch().unwrap_err();
        assert!(err
            .to_string()
            .ends_with("its output is not JSON with \"Version\": 1"));
        // A secret in a malformed answer is never repeated.
        let err = source("echo '{\"Version\": 1, \"SecretAccessKey\": \"SECRET-X\"}'")
            .fetch()
            .unwrap_err();
        assert!(!err.to_string().contains("SECRET-X"), "{err}");
    }
}
