//! Where S3 credentials come from: the AWS SDKs' default chain, in their order.
//!
//! 1. The environment: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`.
//! 2. The shared files, for the profile `AWS_PROFILE` (else `default`):
//!    `AWS_SHARED_CREDENTIALS_FILE` (else `~/.aws/credentials`) and `AWS_CONFIG_FILE` (else
//!    `~/.aws/config`, where profiles are `[profile NAME]`): the profile's keys (the
//!    credentials file wins over the config file), else its `credential_process`, else its
//!    `web_identity_token_file` with `role_arn`. A profile that assumes a role from another
//!    profile (`source_profile`) or uses SSO is refused with a message saying so. The
//!    profile's `region` is the region when `AWS_REGION` and `AWS_DEFAULT_REGION` are unset.
//! 3. Web identity (EKS IRSA): `AWS_WEB_IDENTITY_TOKEN_FILE` and `AWS_ROLE_ARN`
//!    (`AWS_ROLE_SESSION_NAME` optional), exchanged with STS AssumeRoleWithWebIdentity
//!    (`AWS_ENDPOINT_URL_STS` overrides STS's regional endpoint).
//! 4. Container credentials (ECS, EKS Pod Identity): `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`
//!    or `AWS_CONTAINER_CREDENTIALS_FULL_URI`, with `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`
//!    (read at each fetch) or `AWS_CONTAINER_AUTHORIZATION_TOKEN`.
//! 5. The EC2 instance role, through IMDSv2 (a session token first), unless
//!    `AWS_EC2_METADATA_DISABLED=true`; `AWS_EC2_METADATA_SERVICE_ENDPOINT` overrides its
//!    address.
//!
//! Temporary credentials (2 to 5) carry an expiry; [`super::s3::S3Storage`] fetches them again
//! before it. Nothing here ever prints a secret: [`Fetched`]'s `Debug` hides them, and errors
//! name the source, never its answer.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};
use crate::utc::UtcTime;

/// Keys as a source gave them.
#[derive(Clone, PartialEq, Eq)]
pub struct Fetched {
    pub key: String,
    pub secret: String,
    pub token: Option<String>,
    /// When they stop working; `None` for keys that do not expire.
    pub expires: Option<UtcTime>,
}

impl fmt::Debug for Fetched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fetched")
            .field("key", &self.key)
            .field("secret", &"<redacted>")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("expires", &self.expires)
            .finish()
    }
}

/// A source of keys that can be asked again (the temporary ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A profile's `credential_process`: a command that prints the keys as JSON.
    Process { profile: String, command: String },
    /// STS AssumeRoleWithWebIdentity with the token in `token_file`.
    WebIdentity {
        token_file: PathBuf,
        role_arn: String,
        session_name: String,
        /// STS's URL, e.g. `https://sts.eu-west-1.amazonaws.com/`.
        sts: String,
    },
    /// The ECS/EKS container credentials endpoint.
    Container {
        url: String,
        token: Option<String>,
        token_file: Option<PathBuf>,
    },
    /// The EC2 instance metadata service, IMDSv2.
    Imds { endpoint: String },
}

/// What the chain found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Keys known now (the environment's, a profile's); `None` when `source` must be asked.
    pub keys: Option<Fetched>,
    /// Where to ask for (new) keys; `None` for keys that never change.
    pub source: Option<Source>,
    /// Where the keys come from, for the log line at start and for messages.
    pub origin: String,
    /// The profile's `region`, if it has one.
    pub profile_region: Option<String>,
}

/// How long one request for credentials may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// IMDS answers at once on EC2; elsewhere its address does not answer at all.
const IMDS_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const ECS_HOST: &str = "http://169.254.170.2";
const IMDS_ENDPOINT: &str = "http://169.254.169.254";

/// Follow the chain with the variables `var` gives (empty ones count as unset) and `home`
/// for `~`. Reads files but asks no server and runs no command: the first fetch of a
/// [`Source`] is the caller's.
pub fn resolve(var: &dyn Fn(&str) -> Option<String>, region: &str) -> Result<Resolved> {
    let var = |name: &str| var(name).filter(|v| !v.is_empty());
    // 1. The environment.
    match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
        (Some(key), Some(secret)) => {
            return Ok(Resolved {
                keys: Some(Fetched {
                    key,
                    secret,
                    token: var("AWS_SESSION_TOKEN"),
                    expires: None,
                }),
                source: None,
                origin: "the environment (AWS_ACCESS_KEY_ID)".to_string(),
                profile_region: None,
            });
        }
        (Some(_), None) | (None, Some(_)) => {
            return Err(Error::invalid(
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together (only one is)",
            ));
        }
        (None, None) => {}
    }

    // 2. The shared files.
    let home = var("HOME").map(PathBuf::from);
    let file = |name: &str, default: &str| {
        var(name)
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(default)))
    };
    let credentials_file = file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials");
    let config_file = file("AWS_CONFIG_FILE", ".aws/config");
    let explicit_profile = var("AWS_PROFILE").or_else(|| var("AWS_DEFAULT_PROFILE"));
    let profile_name = explicit_profile
        .clone()
        .unwrap_or_else(|| "default".to_string());
    let from_credentials = match &credentials_file {
        Some(path) => read_profile(path, &profile_name, false)?,
        None => None,
    };
    let from_config = match &config_file {
        Some(path) => read_profile(path, &profile_name, true)?,
        None => None,
    };
    if from_credentials.is_none() && from_config.is_none() && explicit_profile.is_some() {
        let files: Vec<String> = [&credentials_file, &config_file]
            .into_iter()
            .flatten()
            .map(|p| p.display().to_string())
            .collect();
        return Err(Error::invalid(format!(
            "AWS_PROFILE={profile_name}: no such profile in {}",
            files.join(" or ")
        )));
    }
    if from_credentials.is_some() || from_config.is_some() {
        let setting = |name: &str| -> Option<(String, PathBuf)> {
            let look = |found: &Option<Vec<(String, String)>>, path: &Option<PathBuf>| {
                let value = found
                    .as_ref()?
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
                    .filter(|v| !v.is_empty())?;
                Some((value, path.clone()?))
            };
            look(&from_credentials, &credentials_file).or_else(|| look(&from_config, &config_file))
        };
        let profile_region = setting("region").map(|(r, _)| r);
        let region = var("AWS_REGION")
            .or_else(|| var("AWS_DEFAULT_REGION"))
            .or_else(|| profile_region.clone())
            .unwrap_or_else(|| region.to_string());
        if let (Some((key, path)), Some((secret, _))) = (
            setting("aws_access_key_id"),
            setting("aws_secret_access_key"),
        ) {
            return Ok(Resolved {
                keys: Some(Fetched {
                    key,
                    secret,
                    token: setting("aws_session_token").map(|(t, _)| t),
                    expires: None,
                }),
                source: None,
                origin: format!("profile {profile_name:?} in {}", path.display()),
                profile_region,
            });
        }
        if let Some((command, path)) = setting("credential_process") {
            return Ok(Resolved {
                keys: None,
                origin: format!(
                    "the credential_process of profile {profile_name:?} in {}",
                    path.display()
                ),
                source: Some(Source::Process {
                    profile: profile_name,
                    command,
                }),
                profile_region,
            });
        }
        if let (Some((token_file, path)), Some((role_arn, _))) =
            (setting("web_identity_token_file"), setting("role_arn"))
        {
            let session_name = setting("role_session_name").map(|(n, _)| n);
            return Ok(Resolved {
                keys: None,
                origin: format!(
                    "web identity of profile {profile_name:?} in {} (role {role_arn})",
                    path.display()
                ),
                source: Some(web_identity(
                    token_file.into(),
                    role_arn,
                    session_name,
                    &var,
                    &region,
                )),
                profile_region,
            });
        }
        for unsupported in ["role_arn", "source_profile", "sso_session", "sso_start_url"] {
            if let Some((_, path)) = setting(unsupported) {
                return Err(Error::invalid(format!(
                    "profile {profile_name:?} in {} uses {unsupported}, which walsync does not \
                     support (it reads keys, credential_process and web_identity_token_file): \
                     export keys instead, e.g. eval \"$(aws configure export-credentials \
                     --profile {profile_name} --format env)\"",
                    path.display()
                )));
            }
        }
        if explicit_profile.is_some() {
            return Err(Error::invalid(format!(
                "AWS_PROFILE={profile_name}: the profile has no aws_access_key_id and \
                 aws_secret_access_key, credential_process or web_identity_token_file"
            )));
        }
    }
    let region = var("AWS_REGION")
        .or_else(|| var("AWS_DEFAULT_REGION"))
        .unwrap_or_else(|| region.to_string());

    // 3. Web identity.
    if let (Some(token_file), Some(role_arn)) =
        (var("AWS_WEB_IDENTITY_TOKEN_FILE"), var("AWS_ROLE_ARN"))
    {
        return Ok(Resolved {
            keys: None,
            origin: format!("web identity (AWS_WEB_IDENTITY_TOKEN_FILE, role {role_arn})"),
            source: Some(web_identity(
                token_file.into(),
                role_arn,
                var("AWS_ROLE_SESSION_NAME"),
                &var,
                &region,
            )),
            profile_region: None,
        });
    }

    // 4. Container credentials.
    let container_url = var("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
        .map(|relative| format!("{ECS_HOST}{relative}"))
        .or_else(|| var("AWS_CONTAINER_CREDENTIALS_FULL_URI"));
    if let Some(url) = container_url {
        return Ok(Resolved {
            keys: None,
            origin: format!("the container credentials endpoint {url}"),
            source: Some(Source::Container {
                url,
                token: var("AWS_CONTAINER_AUTHORIZATION_TOKEN"),
                token_file: var("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE").map(PathBuf::from),
            }),
            profile_region: None,
        });
    }

    // 5. The instance role.
    if var("AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Err(Error::invalid(
            "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE \
             (shared files), or run where container or web identity credentials are provided \
             (AWS_EC2_METADATA_DISABLED=true rules out the instance role)",
        ));
    }
    let endpoint = var("AWS_EC2_METADATA_SERVICE_ENDPOINT")
        .unwrap_or_else(|| IMDS_ENDPOINT.to_string())
        .trim_end_matches('/')
        .to_string();
    Ok(Resolved {
        keys: None,
        origin: format!("the EC2 instance role (IMDSv2 at {endpoint})"),
        source: Some(Source::Imds { endpoint }),
        profile_region: None,
    })
}

fn web_identity(
    token_file: PathBuf,
    role_arn: String,
    session_name: Option<String>,
    var: &dyn Fn(&str) -> Option<String>,
    region: &str,
) -> Source {
    let sts = var("AWS_ENDPOINT_URL_STS").unwrap_or_else(|| {
        if region.starts_with("cn-") {
            format!("https://sts.{region}.amazonaws.com.cn")
        } else {
            format!("https://sts.{region}.amazonaws.com")
        }
    });
    let session_name =
        session_name.unwrap_or_else(|| format!("walsync-{}", UtcTime::now().millis() / 1000));
    Source::WebIdentity {
        token_file,
        role_arn,
        session_name,
        sts,
    }
}

/// The settings of `profile` in the INI file at `path` (`[profile NAME]` or `[NAME]` in the
/// config file, `[NAME]` in the credentials file); `None` if the file or the profile is not
/// there. Keys are lowercased; indented lines (sub-sections such as `s3 =`) are skipped.
fn read_profile(path: &Path, profile: &str, config: bool) -> Result<Option<Vec<(String, String)>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::new(
                ErrorKind::Io,
                format!("reading the AWS shared file {}: {e}", path.display()),
            ))
        }
    };
    let mut found: Option<Vec<(String, String)>> = None;
    let mut in_profile = false;
    for line in text.lines() {
        if line.starts_with([' ', '\t']) {
            continue;
        }
        let line = line.trim();
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let section = section.trim();
            let name = if config {
                match section.strip_prefix("profile ") {
                    Some(name) => name.trim(),
                    None if section == "default" => section,
                    None => "",
                }
            } else {
                section
            };
            in_profile = name == profile;
            if in_profile && found.is_none() {
                found = Some(Vec::new());
            }
            continue;
        }
        if !in_profile {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            if let Some(settings) = found.as_mut() {
                settings.push((key.trim().to_ascii_lowercase(), value.trim().to_string()));
            }
        }
    }
    Ok(found)
}

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
            let code = super::xml::text(&text, "Code").ok().flatten();
            let message = super::xml::text(&text, "Message").ok().flatten();
            return Err(format!(
                "HTTP {status} {}: {}",
                code.unwrap_or_default(),
                message.unwrap_or_default()
            ));
        }
        other => body(other, "AssumeRoleWithWebIdentity")?,
    };
    let content = super::xml::expect_root(&text, "AssumeRoleWithWebIdentityResponse")?;
    let credentials = super::xml::elements(content, "Credentials")
        .next()
        .ok_or("no <Credentials> in STS's answer")??;
    let expiration = super::xml::required(credentials, "Expiration")?;
    Ok(Fetched {
        key: super::xml::required(credentials, "AccessKeyId")?,
        secret: super::xml::required(credentials, "SecretAccessKey")?,
        token: super::xml::text(credentials, "SessionToken")?,
        expires: Some(
            UtcTime::parse_rfc3339(&expiration)
                .map_err(|_| format!("unreadable Expiration {expiration:?}"))?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(list: Vec<(&'static str, String)>) -> impl Fn(&str) -> Option<String> {
        move |name| {
            list.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn the_environment_comes_first() {
        let r = resolve(
            &vars(vec![
                ("AWS_ACCESS_KEY_ID", "AKID".into()),
                ("AWS_SECRET_ACCESS_KEY", "secret".into()),
                ("AWS_SESSION_TOKEN", "tok".into()),
                ("AWS_PROFILE", "nonexistent".into()),
            ]),
            "us-east-1",
        )
        .unwrap();
        let keys = r.keys.unwrap();
        assert_eq!(
            (keys.key.as_str(), keys.token.as_deref()),
            ("AKID", Some("tok"))
        );
        assert_eq!(r.source, None);
        assert_eq!(r.origin, "the environment (AWS_ACCESS_KEY_ID)");
        let err = resolve(
            &vars(vec![("AWS_ACCESS_KEY_ID", "AKID".into())]),
            "us-east-1",
        )
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid);
    }

    #[test]
    fn profiles_from_both_files_with_the_credentials_file_first() {
        let dir = tempfile::tempdir().unwrap();
        let credentials = dir.path().join("credentials");
        let config = dir.path().join("config");
        std::fs::write(
            &credentials,
            "# keys\n[default]\naws_access_key_id = DEFAULTKEY\naws_secret_access_key = d-secret\n\n\
             [prod]\naws_access_key_id=PRODKEY\naws_secret_access_key = p-secret\n",
        )
        .unwrap();
        std::fs::write(
            &config,
            "[default]\nregion = eu-west-3\n[profile prod]\nregion = ap-south-1\n\
             aws_access_key_id = IGNORED\ns3 =\n  addressing_style = path\n\
             [profile tool]\ncredential_process = /usr/bin/get-keys --for walsync\n\
             [profile role]\nrole_arn = arn:aws:iam::1:role/r\nsource_profile = prod\n\
             [profile irsa]\nrole_arn = arn:aws:iam::1:role/w\nweb_identity_token_file = /t\n\
             [profile empty]\nregion = us-west-2\n",
        )
        .unwrap();
        let home = dir.path().join("home");
        let with = |profile: Option<&str>| {
            let mut list = vec![
                (
                    "AWS_SHARED_CREDENTIALS_FILE",
                    credentials.display().to_string(),
                ),
                ("AWS_CONFIG_FILE", config.display().to_string()),
                ("HOME", home.display().to_string()),
            ];
            if let Some(profile) = profile {
                list.push(("AWS_PROFILE", profile.to_string()));
            }
            resolve(&vars(list), "us-east-1")
        };
        let r = with(None).unwrap();
        assert_eq!(r.keys.as_ref().unwrap().key, "DEFAULTKEY");
        assert_eq!(r.profile_region.as_deref(), Some("eu-west-3"));
        assert_eq!(
            r.origin,
            format!("profile \"default\" in {}", credentials.display())
        );
        let r = with(Some("prod")).unwrap();
        let keys = r.keys.unwrap();
        assert_eq!(
            (keys.key.as_str(), keys.secret.as_str()),
            ("PRODKEY", "p-secret")
        );
        assert_eq!(r.profile_region.as_deref(), Some("ap-south-1"));
        let r = with(Some("tool")).unwrap();
        assert_eq!(r.keys, None);
        assert_eq!(
            r.source,
            Some(Source::Process {
                profile: "tool".into(),
                command: "/usr/bin/get-keys --for walsync".into()
            })
        );
        let r = with(Some("irsa")).unwrap();
        assert!(
            matches!(&r.source, Some(Source::WebIdentity { role_arn, sts, .. })
                if role_arn == "arn:aws:iam::1:role/w" && sts == "https://sts.us-east-1.amazonaws.com"),
            "{r:?}"
        );
        let err = with(Some("role")).unwrap_err().to_string();
        assert!(
            err.contains("uses role_arn, which walsync does not support"),
            "{err}"
        );
        let err = with(Some("empty")).unwrap_err().to_string();
        assert!(
            err.starts_with("AWS_PROFILE=empty: the profile has no"),
            "{err}"
        );
        let err = with(Some("missing")).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "AWS_PROFILE=missing: no such profile in {} or {}",
                credentials.display(),
                config.display()
            )
        );
    }

    #[test]
    fn then_web_identity_container_and_instance_role() {
        let r = resolve(
            &vars(vec![
                ("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/token".into()),
                ("AWS_ROLE_ARN", "arn:aws:iam::1:role/x".into()),
                ("AWS_ROLE_SESSION_NAME", "s".into()),
                ("AWS_REGION", "cn-north-1".into()),
                ("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "/v2/creds".into()),
            ]),
            "us-east-1",
        )
        .unwrap();
        assert_eq!(
            r.source,
            Some(Source::WebIdentity {
                token_file: "/var/run/token".into(),
                role_arn: "arn:aws:iam::1:role/x".into(),
                session_name: "s".into(),
                sts: "https://sts.cn-north-1.amazonaws.com.cn".into()
            })
        );
        let r = resolve(
            &vars(vec![
                ("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "/v2/creds".into()),
                ("AWS_CONTAINER_AUTHORIZATION_TOKEN", "t".into()),
            ]),
            "us-east-1",
        )
        .unwrap();
        assert_eq!(
            r.source,
            Some(Source::Container {
                url: "http://169.254.170.2/v2/creds".into(),
                token: Some("t".into()),
                token_file: None
            })
        );
        let r = resolve(&vars(vec![]), "us-east-1").unwrap();
        assert_eq!(
            r.source,
            Some(Source::Imds {
                endpoint: "http://169.254.169.254".into()
            })
        );
        let err = resolve(
            &vars(vec![("AWS_EC2_METADATA_DISABLED", "true".into())]),
            "us-east-1",
        )
        .unwrap_err();
        assert!(err
            .to_string()
            .starts_with("no S3 credentials: set AWS_ACCESS_KEY_ID"));
    }

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
