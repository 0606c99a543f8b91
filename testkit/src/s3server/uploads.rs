//! ListMultipartUploads, which s3s-fs lacks: the test server answers it itself, from the
//! metadata files s3s-fs keeps for incomplete uploads (each upload's start time being its
//! file's mtime, which [`S3Server::age_uploads`](super::S3Server::age_uploads) moves back).
//! Apart because it reads s3s-fs's files behind its back, by their naming scheme, which no
//! other part of the server knows.

use std::path::{Path, PathBuf};

use super::BUCKET;

/// An incomplete multipart upload, from s3s-fs's files.
pub(super) struct Upload {
    pub(super) key: String,
    id: String,
    started: std::time::SystemTime,
}

/// The metadata files of s3s-fs's incomplete uploads
/// (`.bucket-<b64>.object-<b64>.upload-<uuid>.metadata.json`) and what they say.
pub(super) fn upload_files(root: &Path) -> Vec<(PathBuf, Upload)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(root).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix(".bucket-") else {
            continue;
        };
        let Some(rest) = rest.strip_suffix(".metadata.json") else {
            continue;
        };
        let Some((bucket_and_key, id)) = rest.split_once(".upload-") else {
            continue;
        };
        let Some((_, key)) = bucket_and_key.split_once(".object-") else {
            continue;
        };
        let started = entry.metadata().unwrap().modified().unwrap();
        let key = String::from_utf8(base64_url_decode(key)).unwrap();
        let id = id.to_string();
        found.push((entry.path(), Upload { key, id, started }));
    }
    found
}

/// Base64 with the URL-safe alphabet and no padding, as s3s-fs names its files.
fn base64_url_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'-' => 62,
        b'_' => 63,
        _ => panic!("not base64url: {text}"),
    };
    let mut out = Vec::new();
    let (mut bits, mut n) = (0u32, 0);
    for c in text.bytes() {
        bits = (bits << 6) | u32::from(value(c));
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    out
}

/// The document of a ListMultipartUploads answer (one page) for the raw query `query`:
/// like s3s-fs's listings, it echoes `encoding-type=url` and encodes nothing.
pub(super) fn list_uploads(root: &Path, query: &str) -> String {
    let mut prefix = String::new();
    let mut encoding = false;
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_encoding::percent_decode_str(value)
            .decode_utf8()
            .unwrap()
            .to_string();
        match name {
            "prefix" => prefix = value,
            "encoding-type" => encoding = value == "url",
            _ => {}
        }
    }
    let mut uploads: Vec<Upload> = upload_files(root)
        .into_iter()
        .map(|(_, upload)| upload)
        .filter(|u| u.key.starts_with(&prefix))
        .collect();
    uploads.sort_by(|a, b| (&a.key, &a.id).cmp(&(&b.key, &b.id)));
    let escape = |text: &str| {
        text.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let mut body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListMultipartUploadsResult>\
         <Bucket>{BUCKET}</Bucket><Prefix>{}</Prefix><IsTruncated>false</IsTruncated>",
        escape(&prefix)
    );
    if encoding {
        body.push_str("<EncodingType>url</EncodingType>");
    }
    for upload in uploads {
        let millis = upload
            .started
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        let initiated = walsync::UtcTime::from_millis(millis as i64).to_rfc3339();
        body.push_str(&format!(
            "<Upload><Key>{}</Key><UploadId>{}</UploadId><Initiated>{initiated}</Initiated></Upload>",
            escape(&upload.key),
            upload.id
        ));
    }
    body.push_str("</ListMultipartUploadsResult>");
    body
}
