//! What a failed S3 request means, and how walsync says so.
//!
//! A failure is one of the [`ErrorKind`]s the rest of walsync acts on: transient ones are
//! retried ([`super::request`]), the others are reported at once. [`classify_status`] reads
//! the kind from the HTTP status and the code of S3's error document, and writes the message:
//! what failed, the server's own code and words, and a hint chosen by the code (the region to
//! set, the clock, which key is wrong, the permissions a refusal is about). Transport failures
//! get the same treatment, certificates included, in [`S3Storage::transport_error`].
//!
//! Every message names the destination, the operation and the relative key
//! ([`S3Storage::error`]), and none prints a secret: [`S3Storage::redact`] removes the keys,
//! the session token and any signature a server echoes, and nothing else.

use std::fmt;

use url::Url;

use super::documents::xml_text;
use super::S3Storage;
use crate::error::{Error, ErrorKind};
use crate::storage::Storage as _;
use crate::utc::UtcTime;

impl S3Storage {
    /// An error about `op` on `key`: `s3://bucket/prefix: GET app/state.json: {detail}`.
    pub(super) fn error(
        &self,
        kind: ErrorKind,
        op: &str,
        key: &str,
        detail: impl fmt::Display,
    ) -> Error {
        Error::new(kind, format!("{}: {op} {key}: {detail}", self.describe()))
    }

    /// An error for an answer with `status` and error document `body` that came with a
    /// success status (S3 can answer 200 and still fail).
    pub(super) fn answer_error(&self, op: &str, key: &str, status: u16, body: &str) -> Error {
        let bucket = self.bucket();
        let cx = AnswerContext {
            bucket: bucket.name(),
            region: bucket.region(),
            bucket_region: None,
        };
        let (kind, detail) = classify_status(status, body, &cx);
        self.error(kind, op, key, self.redact(&detail))
            .with_response(status, &xml_text(body, "Code"))
    }

    /// An error for a request that got no response.
    pub(super) fn transport_error(
        &self,
        op: &str,
        key: &str,
        url: &Url,
        err: &ureq::Error,
    ) -> Error {
        if let Some(tls) = tls_failure(err) {
            // A certificate that does not verify will not verify on the next attempt either.
            let hint = if tls.contains("certificate") {
                format!(
                    "it was checked against {}; if the store's certificate comes from a private \
                     CA, set AWS_CA_BUNDLE (or SSL_CERT_FILE or SSL_CERT_DIR) to the CA's PEM file",
                    self.ca_roots.describe()
                )
            } else {
                "check that the endpoint speaks TLS (https://) on that port".to_string()
            };
            let detail = format!(
                "TLS failure with {}: {tls}: {hint}",
                url.host_str().unwrap_or_default()
            );
            return self.error(ErrorKind::Auth, op, key, self.redact(&detail));
        }
        let kind = match err {
            ureq::Error::Timeout(_)
            | ureq::Error::Io(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::HostNotFound
            | ureq::Error::Protocol(_)
            | ureq::Error::BodyStalled => ErrorKind::Transient,
            _ => ErrorKind::Other,
        };
        let detail = format!("{err} (requesting {})", without_query(url));
        self.error(kind, op, key, self.redact(&detail))
    }

    /// `text` without the secret key, the session token, or any signature or token value a
    /// server may have echoed: only those, the rest of the text is kept as it was.
    pub(super) fn redact(&self, text: &str) -> String {
        let mut text = text.to_string();
        let keys = self
            .keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for secret in keys.current.iter().flat_map(|c| c.secrets()) {
            // A secret too short to be real would match ordinary words.
            if secret.len() >= 8 {
                text = text.replace(secret, "<redacted>");
            }
        }
        for marker in ["signature=", "security-token=", "security-token:"] {
            text = scrub_values(&text, marker);
        }
        text
    }
}

/// The bucket itself is missing (not only the key asked for).
pub(super) fn is_missing_bucket(err: &Error) -> bool {
    err.s3_code() == Some("NoSuchBucket")
}

/// The server does not implement the request (HTTP 501, `NotImplemented`): for
/// DeleteObjects, which some S3-compatible servers lack.
pub(super) fn is_not_implemented(err: &Error) -> bool {
    err.http_status() == Some(501) || err.s3_code() == Some("NotImplemented")
}

/// Where an error answer came from, for the hints of [`classify_status`].
pub(super) struct AnswerContext<'a> {
    pub(super) bucket: &'a str,
    /// The region the request was signed for.
    pub(super) region: &'a str,
    /// The `x-amz-bucket-region` header of the answer.
    pub(super) bucket_region: Option<&'a str>,
}

/// The region the bucket is really in, when the answer says the request went to the wrong
/// one (AWS: `PermanentRedirect`, `AuthorizationHeaderMalformed`, a 301, or a 400 with an
/// `x-amz-bucket-region` that is not the region signed for) and names it.
pub(super) fn wrong_region(status: u16, body: &str, cx: &AnswerContext<'_>) -> Option<String> {
    if !is_wrong_region(status, body, cx) {
        return None;
    }
    let from_body = xml_text(body, "Region");
    let from_message = xml_text(body, "Message");
    // "...; the region 'us-east-1' is wrong; expecting 'eu-west-1'"
    let expecting = from_message
        .split("expecting '")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .unwrap_or_default()
        .to_string();
    [
        cx.bucket_region.unwrap_or_default().to_string(),
        from_body,
        expecting,
    ]
    .into_iter()
    .find(|region| {
        !region.is_empty()
            && region != cx.region
            && region
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    })
}

fn is_wrong_region(status: u16, body: &str, cx: &AnswerContext<'_>) -> bool {
    let code = xml_text(body, "Code");
    match code.as_str() {
        "PermanentRedirect"
        | "AuthorizationHeaderMalformed"
        | "AuthorizationQueryParametersError"
        | "IllegalLocationConstraintException"
        | "IncorrectEndpoint" => true,
        _ => {
            matches!(status, 301 | 307)
                || (status == 400
                    && cx
                        .bucket_region
                        .is_some_and(|r| !r.is_empty() && r != cx.region))
        }
    }
}

/// The kind and a description of an S3 failure, from the HTTP status and the XML error
/// body: what failed, the server's own code and message (entities decoded), and a hint
/// chosen by the code.
pub(super) fn classify_status(
    status: u16,
    body: &str,
    cx: &AnswerContext<'_>,
) -> (ErrorKind, String) {
    let code = xml_text(body, "Code");
    let message = shorten(&xml_text(body, "Message"));
    let http = if code.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status} {code}")
    };
    let answer = if message.is_empty() {
        format!("({http})")
    } else {
        format!("({http}: {message})")
    };
    let said = |what: &str, hint: &str| {
        if hint.is_empty() {
            format!("{what} {answer}")
        } else {
            format!("{what} {answer}: {hint}")
        }
    };
    if is_wrong_region(status, body, cx) {
        let hint = match wrong_region(status, body, cx) {
            Some(region) => format!(
                "the bucket is in region {region}, requests were signed for {}: set AWS_REGION={region}",
                cx.region
            ),
            None => format!(
                "requests were signed for region {}: set AWS_REGION to the bucket's region \
                 (or the endpoint to the store's)",
                cx.region
            ),
        };
        return (
            ErrorKind::Other,
            said("wrong region for this bucket", &hint),
        );
    }
    match code.as_str() {
        "NoSuchBucket" => (
            ErrorKind::NotFound,
            format!("bucket {:?} does not exist ({http})", cx.bucket),
        ),
        "NoSuchKey" | "NoSuchUpload" => (ErrorKind::NotFound, format!("not found ({http})")),
        "InvalidAccessKeyId" => (
            ErrorKind::Auth,
            said(
                "access denied",
                "the store knows no such access key: check AWS_ACCESS_KEY_ID (and that the \
                 endpoint is the store the key belongs to)",
            ),
        ),
        "SignatureDoesNotMatch" => (
            ErrorKind::Auth,
            said(
                "access denied",
                "the secret key does not match the access key: check AWS_SECRET_ACCESS_KEY",
            ),
        ),
        "ExpiredToken" | "InvalidToken" | "TokenRefreshRequired" => (
            ErrorKind::Auth,
            said(
                "access denied",
                "the temporary credentials expired or are not valid: renew AWS_SESSION_TOKEN \
                 with its AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
            ),
        ),
        "RequestTimeTooSkewed" => {
            let server = xml_text(body, "ServerTime");
            let hint = if server.is_empty() {
                "this host's clock is off: set it right (NTP)".to_string()
            } else {
                format!(
                    "this host's clock is off (the store's time is {server}, this host's {}): \
                     set it right (NTP)",
                    UtcTime::now().to_rfc3339()
                )
            };
            (ErrorKind::Auth, said("access denied", &hint))
        }
        "AccessDenied" | "AllAccessDisabled" | "AccountProblem" | "InvalidObjectState" => (
            ErrorKind::Auth,
            said(
                "access denied",
                "the store accepted the credentials but refused this request: see its \
                 message; check the permissions of the key (IAM and bucket policies, a KMS \
                 key policy for an encrypted bucket)",
            ),
        ),
        "SlowDown" | "InternalError" | "ServiceUnavailable" | "RequestTimeout" | "BadDigest" => {
            (ErrorKind::Transient, said("temporary failure", ""))
        }
        // Retrying cannot help: the server lacks the request (some lack DeleteObjects).
        "NotImplemented" => (ErrorKind::Other, said("not implemented by this server", "")),
        _ => match status {
            403 => (
                ErrorKind::Auth,
                said(
                    "access denied",
                    "check the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and \
                     their permissions",
                ),
            ),
            404 => (ErrorKind::NotFound, format!("not found ({http})")),
            501 => (ErrorKind::Other, said("not implemented by this server", "")),
            429 | 500..=599 => (ErrorKind::Transient, said("temporary failure", "")),
            _ => (ErrorKind::Other, said("request failed", "")),
        },
    }
}

/// The rustls failure behind a transport error, if it is one.
fn tls_failure(err: &ureq::Error) -> Option<String> {
    match err {
        ureq::Error::Rustls(e) => Some(e.to_string()),
        ureq::Error::Io(e) => e
            .get_ref()?
            .downcast_ref::<rustls::Error>()
            .map(|e| e.to_string()),
        _ => None,
    }
}

/// Server messages are for people: keep them to one short line.
pub(super) fn shorten(message: &str) -> String {
    let line: String = message.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() > 300 {
        format!("{}...", line.chars().take(300).collect::<String>())
    } else {
        line
    }
}

/// The URL without its query string, for messages.
fn without_query(url: &Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.set_fragment(None);
    url.to_string()
}

/// `text` with the value after each `marker` (ASCII case ignored) replaced by
/// `<redacted>`: a value ends at `&`, `,`, `;`, a quote, `<` or a blank.
fn scrub_values(text: &str, marker: &str) -> String {
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut from = 0;
    while let Some(at) = lower[from..].find(marker) {
        let value_start = from + at + marker.len();
        let value_len = text[value_start..]
            .find(|c: char| matches!(c, '&' | ',' | ';' | '"' | '\'' | '<') || c.is_whitespace())
            .unwrap_or(text.len() - value_start);
        out.push_str(&text[from..value_start]);
        if value_len > 0 {
            out.push_str("<redacted>");
        }
        from = value_start + value_len;
    }
    out.push_str(&text[from..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::s3::tests::config;

    const CX: AnswerContext<'static> = AnswerContext {
        bucket: "b",
        region: "us-east-1",
        bucket_region: None,
    };

    #[test]
    fn statuses_and_codes_map_to_kinds() {
        let xml = |code: &str| {
            format!("<?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>Some words.</Message></Error>")
        };
        let kind = |status, body: &str| classify_status(status, body, &CX).0;
        assert_eq!(kind(403, &xml("SignatureDoesNotMatch")), ErrorKind::Auth);
        assert_eq!(kind(403, &xml("InvalidAccessKeyId")), ErrorKind::Auth);
        assert_eq!(kind(403, &xml("AccessDenied")), ErrorKind::Auth);
        assert_eq!(kind(403, ""), ErrorKind::Auth);
        assert_eq!(kind(400, &xml("ExpiredToken")), ErrorKind::Auth);
        assert_eq!(kind(403, &xml("RequestTimeTooSkewed")), ErrorKind::Auth);
        assert_eq!(kind(404, &xml("NoSuchKey")), ErrorKind::NotFound);
        assert_eq!(kind(404, ""), ErrorKind::NotFound);
        assert_eq!(kind(404, &xml("NoSuchBucket")), ErrorKind::NotFound);
        assert_eq!(kind(503, &xml("SlowDown")), ErrorKind::Transient);
        assert_eq!(kind(500, ""), ErrorKind::Transient);
        assert_eq!(kind(429, ""), ErrorKind::Transient);
        assert_eq!(kind(400, &xml("RequestTimeout")), ErrorKind::Transient);
        assert_eq!(kind(400, &xml("BadDigest")), ErrorKind::Transient);
        assert_eq!(kind(200, &xml("InternalError")), ErrorKind::Transient);
        assert_eq!(kind(400, &xml("InvalidArgument")), ErrorKind::Other);
        assert_eq!(kind(301, &xml("PermanentRedirect")), ErrorKind::Other);
        assert_eq!(kind(301, ""), ErrorKind::Other);
        assert_eq!(kind(409, ""), ErrorKind::Other);
        assert_eq!(kind(501, ""), ErrorKind::Other);
        assert_eq!(kind(501, &xml("NotImplemented")), ErrorKind::Other);
        assert_eq!(kind(400, &xml("NotImplemented")), ErrorKind::Other);

        let (_, detail) = classify_status(404, &xml("NoSuchBucket"), &CX);
        assert_eq!(
            detail,
            "bucket \"b\" does not exist (HTTP 404 NoSuchBucket)"
        );
        let (_, detail) = classify_status(400, &xml("InvalidArgument"), &CX);
        assert_eq!(
            detail,
            "request failed (HTTP 400 InvalidArgument: Some words.)"
        );
    }

    fn detail(status: u16, body: &str, cx: &AnswerContext<'_>) -> String {
        classify_status(status, body, cx).1
    }

    /// Error documents as AWS sends them (from its documentation and real answers).
    #[test]
    fn wrong_region_answers_name_the_region_to_set() {
        // A presigned request's wrong region: the old filter cut this at "X-Amz-Credential".
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error>\
            <Code>AuthorizationQueryParametersError</Code><Message>Error parsing the \
            X-Amz-Credential parameter; the region &apos;us-east-1&apos; is wrong; expecting \
            &apos;eu-west-1&apos;</Message><RequestId>0H5S3Y1B2XK0ZBJ2</RequestId>\
            <HostId>Xc1p+x</HostId></Error>";
        assert_eq!(
            detail(400, body, &CX),
            "wrong region for this bucket (HTTP 400 AuthorizationQueryParametersError: Error \
             parsing the X-Amz-Credential parameter; the region 'us-east-1' is wrong; expecting \
             'eu-west-1'): the bucket is in region eu-west-1, requests were signed for \
             us-east-1: set AWS_REGION=eu-west-1"
        );
        let body = "<Error><Code>AuthorizationHeaderMalformed</Code><Message>The authorization \
            header is malformed; the region &apos;us-east-1&apos; is wrong; expecting \
            &apos;ap-southeast-2&apos;</Message><Region>ap-southeast-2</Region>\
            <RequestId>R</RequestId><HostId>H</HostId></Error>";
        assert_eq!(
            wrong_region(400, body, &CX).as_deref(),
            Some("ap-southeast-2")
        );
        assert!(detail(400, body, &CX).ends_with("set AWS_REGION=ap-southeast-2"));
        // A 301 to a HEAD has no body: the header says where the bucket is.
        let cx = AnswerContext {
            bucket_region: Some("eu-central-1"),
            ..CX
        };
        assert_eq!(
            detail(301, "", &cx),
            "wrong region for this bucket (HTTP 301): the bucket is in region eu-central-1, \
             requests were signed for us-east-1: set AWS_REGION=eu-central-1"
        );
        let body = "<Error><Code>PermanentRedirect</Code><Message>The bucket you are attempting \
            to access must be addressed using the specified endpoint. Please send all future \
            requests to this endpoint.</Message><Endpoint>b.s3.eu-central-1.amazonaws.com\
            </Endpoint><Bucket>b</Bucket></Error>";
        assert_eq!(
            wrong_region(301, body, &cx).as_deref(),
            Some("eu-central-1")
        );
        assert_eq!(wrong_region(301, body, &CX), None);
        assert!(detail(301, body, &CX).ends_with(
            "requests were signed for region us-east-1: set AWS_REGION to the bucket's region \
             (or the endpoint to the store's)"
        ));
        // The region asked for is not "wrong".
        let same = AnswerContext {
            bucket_region: Some("us-east-1"),
            ..CX
        };
        assert_eq!(
            classify_status(400, "<Error><Code>InvalidRequest</Code></Error>", &same).0,
            ErrorKind::Other
        );
        assert_eq!(wrong_region(400, "", &same), None);
    }

    #[test]
    fn clock_credential_and_permission_answers_keep_the_servers_words() {
        let body = "<Error><Code>RequestTimeTooSkewed</Code><Message>The difference between the \
            request time and the current time is too large.</Message>\
            <RequestTime>20261206T120000Z</RequestTime><ServerTime>2026-12-06T13:00:00Z\
            </ServerTime><MaxAllowedSkewMilliseconds>900000</MaxAllowedSkewMilliseconds></Error>";
        let text = detail(403, body, &CX);
        assert!(
            text.starts_with(
                "access denied (HTTP 403 RequestTimeTooSkewed: The difference between the \
                 request time and the current time is too large.): this host's clock is off \
                 (the store's time is 2026-12-06T13:00:00Z, this host's "
            ),
            "{text}"
        );
        assert!(text.ends_with("): set it right (NTP)"), "{text}");

        let body = "<Error><Code>InvalidAccessKeyId</Code><Message>The AWS Access Key Id you \
            provided does not exist in our records.</Message><AWSAccessKeyId>AKIAEXAMPLE\
            </AWSAccessKeyId></Error>";
        assert_eq!(
            detail(403, body, &CX),
            "access denied (HTTP 403 InvalidAccessKeyId: The AWS Access Key Id you provided \
             does not exist in our records.): the store knows no such access key: check \
             AWS_ACCESS_KEY_ID (and that the endpoint is the store the key belongs to)"
        );
        let body = "<Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we \
            calculated does not match the signature you provided. Check your key and signing \
            method.</Message><AWSAccessKeyId>AKIAEXAMPLE</AWSAccessKeyId><StringToSign>\
            AWS4-HMAC-SHA256</StringToSign><SignatureProvided>abc</SignatureProvided>\
            <CanonicalRequest>GET x-amz-security-token:TOKEN</CanonicalRequest></Error>";
        assert_eq!(
            detail(403, body, &CX),
            "access denied (HTTP 403 SignatureDoesNotMatch: The request signature we \
             calculated does not match the signature you provided. Check your key and signing \
             method.): the secret key does not match the access key: check \
             AWS_SECRET_ACCESS_KEY"
        );
        // Denials keep the server's reason: expiry, a policy, a KMS key.
        let body = "<Error><Code>AccessDenied</Code><Message>Request has expired</Message>\
            <X-Amz-Expires>3600</X-Amz-Expires><Expires>2026-12-06T12:00:00Z</Expires></Error>";
        assert!(detail(403, body, &CX).starts_with(
            "access denied (HTTP 403 AccessDenied: Request has expired): the store accepted"
        ));
        let body = "<Error><Code>AccessDenied</Code><Message>User: \
            arn:aws:iam::123456789012:user/backup is not authorized to perform: \
            kms:GenerateDataKey on resource: arn:aws:kms:eu-west-1:123456789012:key/1234 \
            because no identity-based policy allows the kms:GenerateDataKey action</Message>\
            </Error>";
        let text = detail(403, body, &CX);
        assert!(
            text.contains("is not authorized to perform: kms:GenerateDataKey on resource"),
            "{text}"
        );
        assert!(text.contains("KMS key policy"), "{text}");
        let body = "<Error><Code>ExpiredToken</Code><Message>The provided token has expired.\
            </Message></Error>";
        assert!(detail(400, body, &CX).ends_with(
            "renew AWS_SESSION_TOKEN with its AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        ));
        // Entities of every kind are decoded.
        let body = "<Error><Code>InvalidArgument</Code><Message>a &lt;b&gt; &amp; \
            &quot;c&quot; &#39;d&#x27;</Message></Error>";
        assert_eq!(
            detail(400, body, &CX),
            "request failed (HTTP 400 InvalidArgument: a <b> & \"c\" 'd')"
        );
    }

    #[test]
    fn redaction_removes_exactly_the_secrets() {
        let token = [
            ("AWS_SESSION_TOKEN", "FQoGZXIvYXdzEXAMPLE"),
            ("AWS_SECRET_ACCESS_KEY", "very-secret-value"),
        ];
        let s = S3Storage::new(config(&token, Some("http://h:1")).unwrap()).unwrap();
        let kept = "Error parsing the X-Amz-Credential parameter; the region 'us-east-1' is wrong";
        assert_eq!(s.redact(kept), kept);
        assert_eq!(
            s.redact("echo very-secret-value and FQoGZXIvYXdzEXAMPLE, key AKIDEXAMPLE"),
            "echo <redacted> and <redacted>, key AKIDEXAMPLE"
        );
        assert_eq!(
            s.redact("url ?X-Amz-Signature=abcdef&x-amz-security-token=zzz&uploadId=1 then"),
            "url ?X-Amz-Signature=<redacted>&x-amz-security-token=<redacted>&uploadId=1 then"
        );
        assert_eq!(
            s.redact("AWS4-HMAC-SHA256 Credential=AKID/x, SignedHeaders=host, Signature=0123abc"),
            "AWS4-HMAC-SHA256 Credential=AKID/x, SignedHeaders=host, Signature=<redacted>"
        );
        assert_eq!(
            s.redact("x-amz-security-token:tok\nhost"),
            "x-amz-security-token:<redacted>\nhost"
        );
        let url = "http://h:1/b/k?uploads=".parse().unwrap();
        assert_eq!(without_query(&url), "http://h:1/b/k");
    }
}
