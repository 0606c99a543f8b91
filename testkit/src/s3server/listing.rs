//! ListObjectsV2 without a delimiter, answered by walking only the prefix's directory.
//!
//! s3s-fs walks the whole bucket for every listing and then filters by prefix, so with a
//! thousand databases stored one `walsync status NAME` took 1.6 s and a restart's thousand
//! LISTs (one per database) took 54 s: the benchmarks measured the test server, not walsync.
//! s3s-fs keeps the object `a/b/c` at `<root>/<bucket>/a/b/c`, so every key under a prefix
//! is a file under the prefix's directory part (`a/b/` of `a/b/c`). [`Listing`] wraps s3s-fs
//! (every other request, and listings with a delimiter, go to it unchanged) and answers such
//! a listing from that directory alone, with s3s-fs's answer: keys in order, at most
//! `max-keys`, resuming after the continuation token or `start-after`, whichever is later.
//! Requests are still signed and checked by s3s, which calls this after authentication.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::SystemTime;

use s3s::dto::*;
use s3s::{S3Request, S3Response, S3Result, S3};
use s3s_fs::FileSystem;

/// s3s-fs, with listings that walk only the prefix's directory.
pub(super) struct Listing {
    fs: FileSystem,
    root: PathBuf,
}

impl Listing {
    pub(super) fn new(root: &Path) -> Listing {
        Listing {
            fs: FileSystem::new(root).expect("s3s-fs root"),
            root: root.to_path_buf(),
        }
    }
}

type Answer<'a, T> = Pin<Box<dyn Future<Output = S3Result<S3Response<T>>> + Send + 'a>>;

/// Pass these requests to s3s-fs as they are. (The S3 trait is an `async_trait`: these are
/// its methods written out, each returning s3s-fs's boxed future.)
macro_rules! to_s3s_fs {
    ($($name:ident($input:ty) -> $output:ty;)*) => {
        $(
            fn $name<'life0, 'async_trait>(
                &'life0 self,
                req: S3Request<$input>,
            ) -> Answer<'async_trait, $output>
            where
                'life0: 'async_trait,
                Self: 'async_trait,
            {
                self.fs.$name(req)
            }
        )*
    };
}

impl S3 for Listing {
    to_s3s_fs! {
        create_bucket(CreateBucketInput) -> CreateBucketOutput;
        copy_object(CopyObjectInput) -> CopyObjectOutput;
        delete_bucket(DeleteBucketInput) -> DeleteBucketOutput;
        delete_object(DeleteObjectInput) -> DeleteObjectOutput;
        delete_objects(DeleteObjectsInput) -> DeleteObjectsOutput;
        get_bucket_location(GetBucketLocationInput) -> GetBucketLocationOutput;
        get_object(GetObjectInput) -> GetObjectOutput;
        head_bucket(HeadBucketInput) -> HeadBucketOutput;
        head_object(HeadObjectInput) -> HeadObjectOutput;
        list_buckets(ListBucketsInput) -> ListBucketsOutput;
        list_objects(ListObjectsInput) -> ListObjectsOutput;
        put_object(PutObjectInput) -> PutObjectOutput;
        create_multipart_upload(CreateMultipartUploadInput) -> CreateMultipartUploadOutput;
        upload_part(UploadPartInput) -> UploadPartOutput;
        upload_part_copy(UploadPartCopyInput) -> UploadPartCopyOutput;
        list_parts(ListPartsInput) -> ListPartsOutput;
        complete_multipart_upload(CompleteMultipartUploadInput) -> CompleteMultipartUploadOutput;
        abort_multipart_upload(AbortMultipartUploadInput) -> AbortMultipartUploadOutput;
    }

    fn list_objects_v2<'life0, 'async_trait>(
        &'life0 self,
        req: S3Request<ListObjectsV2Input>,
    ) -> Answer<'async_trait, ListObjectsV2Output>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let bucket_root = self.root.join(&req.input.bucket);
        if req.input.delimiter.is_some() || !bucket_root.is_dir() {
            return self.fs.list_objects_v2(req);
        }
        Box::pin(async move { Ok(S3Response::new(list(&bucket_root, req.input))) })
    }
}

/// The answer to `input` (no delimiter) for the bucket whose files are under `bucket_root`.
fn list(bucket_root: &Path, input: ListObjectsV2Input) -> ListObjectsV2Output {
    let prefix = input.prefix.clone().unwrap_or_default();
    let dir = match prefix.rfind('/') {
        Some(end) => bucket_root.join(&prefix[..end]),
        None => bucket_root.to_path_buf(),
    };
    let mut found = Vec::new();
    walk(bucket_root, &dir, &mut found);
    found.retain(|(key, _, _)| key.starts_with(&prefix));
    found.sort_by(|a, b| a.0.cmp(&b.0));
    let after = match (&input.continuation_token, &input.start_after) {
        (Some(token), Some(start)) => Some(token.max(start).clone()),
        (token, start) => token.clone().or_else(|| start.clone()),
    };
    if let Some(after) = &after {
        found.retain(|(key, _, _)| key > after);
    }
    let max_keys = input.max_keys.unwrap_or(1000);
    let limit = usize::try_from(max_keys).unwrap_or(0);
    let is_truncated = limit > 0 && found.len() > limit;
    found.truncate(limit);
    let next_continuation_token = is_truncated
        .then(|| found.last().map(|(key, _, _)| key.clone()))
        .flatten();
    let contents: Vec<Object> = found
        .into_iter()
        .map(|(key, size, modified)| Object {
            key: Some(key),
            size: Some(size as i64),
            last_modified: Some(Timestamp::from(modified)),
            ..Default::default()
        })
        .collect();
    ListObjectsV2Output {
        key_count: Some(contents.len() as i32),
        max_keys: Some(max_keys),
        is_truncated: Some(is_truncated),
        contents: (!contents.is_empty()).then_some(contents),
        continuation_token: input.continuation_token,
        next_continuation_token,
        encoding_type: input.encoding_type,
        name: Some(input.bucket),
        prefix: input.prefix,
        start_after: input.start_after,
        ..Default::default()
    }
}

/// Every file under `dir` (none if it does not exist), as its key in the bucket whose files
/// are under `bucket_root`, its size and its modification time.
fn walk(bucket_root: &Path, dir: &Path, found: &mut Vec<(String, u64, SystemTime)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        if meta.is_dir() {
            walk(bucket_root, &path, found);
        } else if let Ok(relative) = path.strip_prefix(bucket_root) {
            let parts: Vec<_> = relative.iter().map(|p| p.to_string_lossy()).collect();
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            found.push((parts.join("/"), meta.len(), modified));
        }
    }
}
