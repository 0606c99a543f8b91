//! What the harness does to the host rather than to walsync or its storage: directories
//! made immutable ([`Frozen`]), a small tmpfs to fill up ([`TmpfsMount`]), a filesystem with
//! whole-second file times ([`CoarseFilesystem`]), an image of files to roll the host back
//! to ([`DiskImage`]), and where libfaketime is, for the clock steps. Each undoes itself when
//! dropped, so that a failed round (or a panic) leaves no mount and no immutable directory
//! behind. Apart from the round because it is plumbing around mount(2), chattr and files,
//! not a step of the chaos.

use std::ffi::CString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `chattr +i` on some directories until dropped (also on a panic or an early return).
pub(super) struct Frozen {
    dirs: Vec<PathBuf>,
}

impl Frozen {
    /// Freeze `dirs` in order; on failure, unfreezes what was frozen and says why.
    pub(super) fn freeze(dirs: Vec<PathBuf>) -> Result<Frozen, String> {
        let mut frozen = Frozen { dirs: Vec::new() };
        for dir in dirs {
            chattr("+i", &dir)?;
            frozen.dirs.push(dir);
        }
        Ok(frozen)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for dir in self.dirs.iter().rev() {
            let _ = chattr("-i", dir);
        }
    }
}

fn chattr(flag: &str, dir: &Path) -> Result<(), String> {
    let output = Command::new("chattr")
        .arg(flag)
        .arg(dir)
        .output()
        .map_err(|e| format!("running chattr: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "chattr {flag} {}: {}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// An ext4 filesystem with 128-byte inodes (file times in whole seconds, as on ext3, HFS+,
/// FAT or NFS on those), loop-mounted on a directory until dropped: then its content is
/// copied to `<dir>.kept` (a kept round shows the database as it was) and the image removed.
pub(super) struct CoarseFilesystem {
    dir: PathBuf,
    image: PathBuf,
}

impl CoarseFilesystem {
    pub(super) fn mount(image: &Path, dir: &Path) -> Result<CoarseFilesystem, String> {
        let run = |cmd: &mut Command| -> Result<(), String> {
            let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{cmd:?}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        File::create(image)
            .and_then(|f| f.set_len(512 << 20))
            .map_err(|e| format!("creating {}: {e}", image.display()))?;
        let mounted = run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-I", "128"])
            .arg(image))
        .and_then(|()| {
            run(Command::new("mount")
                .args(["-o", "loop"])
                .arg(image)
                .arg(dir))
        });
        if let Err(e) = mounted {
            let _ = std::fs::remove_file(image);
            return Err(e);
        }
        Ok(CoarseFilesystem {
            dir: dir.to_path_buf(),
            image: image.to_path_buf(),
        })
    }
}

impl Drop for CoarseFilesystem {
    fn drop(&mut self) {
        let _ = copy_tree(&self.dir, &self.dir.with_extension("kept"));
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_file(&self.image);
    }
}

/// A tmpfs mounted on a directory until dropped: then its content is copied to a plain
/// directory of the same name (a kept round shows the sidecar as it was).
pub(super) struct TmpfsMount {
    dir: PathBuf,
}

impl TmpfsMount {
    pub(super) fn mount(dir: &Path, bytes: u64) -> Result<TmpfsMount, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let target = CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
        let options = CString::new(format!("size={bytes},mode=0755")).map_err(|e| e.to_string())?;
        // SAFETY: mount(2) with valid NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                options.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(format!(
                "mount -t tmpfs on {}: {}",
                dir.display(),
                std::io::Error::last_os_error()
            ));
        }
        Ok(TmpfsMount {
            dir: dir.to_path_buf(),
        })
    }

    /// Fill the filesystem with `file` until writes fail with ENOSPC.
    pub(super) fn fill(&self, file: &Path) -> Result<u64, String> {
        use std::io::Write as _;
        let mut out =
            File::create(file).map_err(|e| format!("creating {}: {e}", file.display()))?;
        let chunk = vec![0u8; 1 << 20];
        let mut written = 0u64;
        loop {
            match out.write(&chunk) {
                Ok(0) => return Err("filling the tmpfs: wrote nothing".into()),
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return Ok(written),
                Err(e) => return Err(format!("filling the tmpfs: {e}")),
            }
        }
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let copy = self.dir.with_extension("tmpfs-copy");
        let _ = copy_tree(&self.dir, &copy);
        let target = CString::new(self.dir.as_os_str().as_encoded_bytes());
        if let Ok(target) = target {
            // SAFETY: umount2(2) on a path we mounted; a lazy unmount if something (a
            // walsync we failed to reap) still uses it.
            unsafe {
                if libc::umount2(target.as_ptr(), 0) != 0 {
                    libc::umount2(target.as_ptr(), libc::MNT_DETACH);
                }
            }
        }
        if std::fs::remove_dir(&self.dir).is_ok() {
            let _ = std::fs::rename(&copy, &self.dir);
        }
    }
}

/// Where libfaketime is, if installed (Debian: package `faketime`).
pub fn find_libfaketime() -> Option<PathBuf> {
    let listed = Command::new("dpkg")
        .args(["-L", "libfaketime"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    listed
        .lines()
        .map(PathBuf::from)
        .chain(
            [
                "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
                "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
                "/usr/lib/faketime/libfaketime.so.1",
                "/usr/local/lib/faketime/libfaketime.so.1",
            ]
            .map(PathBuf::from),
        )
        .find(|p| p.file_name().is_some_and(|n| n == "libfaketime.so.1") && p.exists())
}

pub(super) fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// Files as a VM or filesystem snapshot keeps them: bytes and modification times, put back
/// in place (the same inode where the file still exists).
pub(super) struct DiskImage {
    /// Each file's bytes and modification time, or None if it did not exist.
    files: Vec<(PathBuf, Option<FileContent>)>,
    /// Directories whose whole content is put back (files they hold now and did not then
    /// are removed).
    trees: Vec<PathBuf>,
}

impl DiskImage {
    pub(super) fn take(files: &[PathBuf], tree: &Path) -> Result<DiskImage, String> {
        let mut image = DiskImage {
            files: Vec::new(),
            trees: vec![tree.to_path_buf()],
        };
        let mut all: Vec<PathBuf> = files.to_vec();
        all.extend(files_under(tree)?);
        for path in all {
            let read = || -> std::io::Result<FileContent> {
                let bytes = std::fs::read(&path)?;
                Ok((bytes, std::fs::metadata(&path)?.modified()?))
            };
            match read() {
                Ok(content) => image.files.push((path, Some(content))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    image.files.push((path, None))
                }
                Err(e) => return Err(format!("imaging {}: {e}", path.display())),
            }
        }
        Ok(image)
    }

    pub(super) fn put_back(&self) -> Result<(), String> {
        let kept: std::collections::HashSet<&PathBuf> = self
            .files
            .iter()
            .filter(|(_, c)| c.is_some())
            .map(|(p, _)| p)
            .collect();
        let fail = |p: &Path, e: std::io::Error| format!("rolling back {}: {e}", p.display());
        for tree in &self.trees {
            for path in files_under(tree)? {
                if !kept.contains(&path) {
                    std::fs::remove_file(&path).map_err(|e| fail(&path, e))?;
                }
            }
        }
        for (path, content) in &self.files {
            match content {
                Some((bytes, modified)) => {
                    if let Some(parent) = path.parent() {
                        std::fs::create_dir_all(parent).map_err(|e| fail(parent, e))?;
                    }
                    std::fs::write(path, bytes).map_err(|e| fail(path, e))?;
                    File::options()
                        .write(true)
                        .open(path)
                        .and_then(|f| f.set_modified(*modified))
                        .map_err(|e| fail(path, e))?;
                }
                None => match std::fs::remove_file(path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(fail(path, e))
                    }
                    _ => {}
                },
            }
        }
        Ok(())
    }
}

type FileContent = (Vec<u8>, std::time::SystemTime);

/// Every file under `dir` (recursively); none if it does not exist.
fn files_under(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("reading {}: {e}", d.display())),
        };
        for entry in entries {
            let path = entry.map_err(|e| e.to_string())?.path();
            if path.is_dir() {
                todo.push(path);
            } else {
                files.push(path);
            }
        }
    }
    Ok(files)
}
