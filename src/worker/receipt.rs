//! What a call changed in its workspace: the worker walks the workspace
//! before and after the call and compares the two walks.
//!
//! A path counts as changed when its size, modification time, change time,
//! inode or kind differ; nothing is hashed, so a rewrite that keeps the size
//! within the file system's timestamp granularity of an earlier change can
//! be missed. Symlinks are compared as links, never followed. Directories
//! are listed when created or deleted, not when their entries change.
//!
//! Each walk stops after [`WALK_ENTRIES_MAX`] entries or [`WALK_TIME_MAX`],
//! so a tool that makes millions of files costs the next call a bounded
//! walk, and the receipt says that it is partial. The worker shares the
//! workspace with the other workers of its workflow: what they change
//! during the call is seen too.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::protocol::{ChangedPath, EntryKind, WorkspaceChanges};

/// Entries one walk visits at most.
pub const WALK_ENTRIES_MAX: usize = 100_000;
/// Time one walk takes at most.
pub const WALK_TIME_MAX: Duration = Duration::from_millis(500);
/// Paths each list of a receipt holds at most.
pub const LISTED_MAX: u32 = 100;

/// What one walk saw of a path: enough to tell that it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    kind: EntryKind,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    ino: u64,
}

impl Entry {
    fn of(meta: &std::fs::Metadata) -> Entry {
        let ft = meta.file_type();
        let kind = if ft.is_symlink() {
            EntryKind::Symlink
        } else if ft.is_dir() {
            EntryKind::Dir
        } else if ft.is_file() {
            EntryKind::File
        } else {
            EntryKind::Other
        };
        Entry {
            kind,
            size: if kind == EntryKind::Dir { 0 } else { meta.size() },
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            ino: meta.ino(),
        }
    }

    /// Whether the path changed between `self` (before) and `after`. A
    /// directory changes only when it was replaced: its times move with
    /// every entry made or removed in it, and those are listed themselves.
    fn changed(&self, after: &Entry) -> bool {
        if self.kind != after.kind || self.ino != after.ino {
            return true;
        }
        self.kind != EntryKind::Dir && (self.size, self.mtime, self.ctime) != (after.size, after.mtime, after.ctime)
    }
}

/// One walk of a workspace.
#[derive(Debug, Default)]
pub struct Snapshot {
    entries: HashMap<PathBuf, Entry>,
    /// Directories that could not be listed, relative to the workspace.
    unreadable: HashSet<PathBuf>,
    /// Why the walk stopped early.
    stopped: Option<String>,
    took: Duration,
}

impl Snapshot {
    /// Walks `root` without following symlinks, up to the caps.
    pub fn take(root: &Path) -> Snapshot {
        Self::take_capped(root, WALK_ENTRIES_MAX, WALK_TIME_MAX)
    }

    fn take_capped(root: &Path, max_entries: usize, max_time: Duration) -> Snapshot {
        let start = Instant::now();
        let mut snap = Snapshot::default();
        let mut todo: Vec<PathBuf> = vec![PathBuf::new()];
        'walk: while let Some(rel) = todo.pop() {
            let Ok(dir) = std::fs::read_dir(root.join(&rel)) else {
                snap.unreadable.insert(rel);
                continue;
            };
            for item in dir {
                let Ok(item) = item else {
                    snap.unreadable.insert(rel.clone());
                    break;
                };
                // lstat relative to the open directory: no symlink is followed.
                let Ok(meta) = item.metadata() else { continue };
                let entry = Entry::of(&meta);
                let path = rel.join(item.file_name());
                if entry.kind == EntryKind::Dir {
                    todo.push(path.clone());
                }
                snap.entries.insert(path, entry);
                if snap.entries.len() >= max_entries {
                    snap.stopped = Some(format!("the walk stopped after {max_entries} entries"));
                    break 'walk;
                }
                if snap.entries.len() % 1024 == 0 && start.elapsed() >= max_time {
                    snap.stopped = Some(format!("the walk stopped after {} ms", max_time.as_millis()));
                    break 'walk;
                }
            }
        }
        snap.took = start.elapsed();
        snap
    }

    /// Whether `path` lies inside a directory this walk could not list.
    fn hidden(&self, path: &Path) -> bool {
        !self.unreadable.is_empty() && path.ancestors().skip(1).any(|a| self.unreadable.contains(a))
    }

    /// What changed from `self` (before the call) to `after`.
    pub fn diff(&self, after: &Snapshot) -> WorkspaceChanges {
        let mut out = WorkspaceChanges {
            listed_max: LISTED_MAX,
            entries: after.entries.len() as u64,
            unreadable_dirs: self.unreadable.len().max(after.unreadable.len()) as u64,
            walk_us: u64::try_from((self.took + after.took).as_micros()).unwrap_or(u64::MAX),
            ..WorkspaceChanges::default()
        };
        if let Some(why) = &self.stopped {
            // Any path the first walk missed would look created.
            out.incomplete = Some(format!("{why} before the call: changes were not compared"));
            out.deleted_count = None;
            return out;
        }
        let name = |p: &Path| p.to_string_lossy().into_owned();
        let mut created = Vec::new();
        let mut modified = Vec::new();
        for (path, a) in &after.entries {
            match self.entries.get(path) {
                None if self.hidden(path) => {}
                None => {
                    out.created_count += 1;
                    out.created_bytes += a.size;
                    created.push(ChangedPath { path: name(path), kind: a.kind, size: a.size, size_before: None });
                }
                Some(b) if b.changed(a) => {
                    out.modified_count += 1;
                    out.modified_bytes_delta +=
                        i64::try_from(a.size).unwrap_or(i64::MAX) - i64::try_from(b.size).unwrap_or(i64::MAX);
                    modified.push(ChangedPath {
                        path: name(path),
                        kind: a.kind,
                        size: a.size,
                        size_before: Some(b.size),
                    });
                }
                Some(_) => {}
            }
        }
        let mut deleted = Vec::new();
        if let Some(why) = &after.stopped {
            out.incomplete = Some(format!("{why} after the call: deleted paths are not known"));
        } else {
            let mut n = 0;
            for (path, b) in &self.entries {
                if !after.entries.contains_key(path) && !after.hidden(path) {
                    n += 1;
                    out.deleted_bytes += b.size;
                    deleted.push(ChangedPath { path: name(path), kind: b.kind, size: b.size, size_before: None });
                }
            }
            out.deleted_count = Some(n);
        }
        for (list, into) in [(created, &mut out.created), (modified, &mut out.modified), (deleted, &mut out.deleted)] {
            let (kept, cut) = capped(list, LISTED_MAX as usize);
            *into = kept;
            out.truncated |= cut;
        }
        out
    }
}

/// The first `max` paths in path order, and whether any were left out.
fn capped(mut list: Vec<ChangedPath>, max: usize) -> (Vec<ChangedPath>, bool) {
    let cut = list.len() > max;
    if cut {
        list.select_nth_unstable_by(max, |a, b| a.path.cmp(&b.path));
        list.truncate(max);
    }
    list.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    (list, cut)
}

/// The paths of a list, for assertions.
#[cfg(test)]
fn names(list: &[ChangedPath]) -> Vec<&str> {
    list.iter().map(|c| c.path.as_str()).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::fs;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("corral-receipt-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn lists_exactly_what_changed() {
        let d = tmp("exact");
        fs::write(d.join("keep"), "same").unwrap();
        fs::write(d.join("edit"), "old").unwrap();
        fs::write(d.join("gone"), "12345").unwrap();
        fs::create_dir(d.join("sub")).unwrap();
        fs::write(d.join("sub/inner"), "x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.join("link")).unwrap();
        let before = Snapshot::take(&d);
        // Distinct timestamps even on a coarse clock.
        std::thread::sleep(Duration::from_millis(20));
        fs::write(d.join("edit"), "newer").unwrap();
        fs::remove_file(d.join("gone")).unwrap();
        fs::write(d.join("sub/new"), "abc").unwrap();
        fs::create_dir(d.join("made")).unwrap();
        let _ = fs::read(d.join("keep")).unwrap();
        let c = before.diff(&Snapshot::take(&d));
        assert_eq!(names(&c.created), ["made", "sub/new"]);
        assert_eq!(names(&c.modified), ["edit"]);
        assert_eq!(names(&c.deleted), ["gone"]);
        assert_eq!((c.created_count, c.modified_count, c.deleted_count), (2, 1, Some(1)));
        assert_eq!((c.created_bytes, c.modified_bytes_delta, c.deleted_bytes), (3, 2, 5));
        assert_eq!(c.modified[0].size_before, Some(3));
        assert_eq!(c.created[0].kind, EntryKind::Dir);
        assert!(!c.truncated && c.incomplete.is_none());
        // Nothing changed: an empty receipt.
        let again = Snapshot::take(&d);
        let c = again.diff(&Snapshot::take(&d));
        assert_eq!((c.created_count, c.modified_count, c.deleted_count), (0, 0, Some(0)));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn caps_the_lists_and_the_walk() {
        let d = tmp("cap");
        let before = Snapshot::take(&d);
        for i in 0..250 {
            fs::write(d.join(format!("f{i:03}")), "x").unwrap();
        }
        let c = before.diff(&Snapshot::take(&d));
        assert_eq!(c.created.len(), LISTED_MAX as usize);
        assert_eq!(c.created[0].path, "f000");
        assert_eq!((c.created_count, c.created_bytes), (250, 250));
        assert!(c.truncated);
        // A walk cut at 100 entries after the call: what it saw is listed,
        // deletions are unknown, and the receipt says so.
        let cut = Snapshot::take_capped(&d, 100, WALK_TIME_MAX);
        let c = before.diff(&cut);
        assert_eq!(c.created_count, 100);
        assert_eq!(c.deleted_count, None);
        assert!(c.incomplete.as_deref().unwrap().contains("100 entries"), "{c:?}");
        // Cut before the call: nothing is compared.
        let c = cut.diff(&Snapshot::take(&d));
        assert_eq!(c.created_count, 0);
        assert!(c.incomplete.as_deref().unwrap().contains("before the call"), "{c:?}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn unreadable_directories_are_counted_not_guessed() {
        use std::os::unix::fs::PermissionsExt;
        let d = tmp("unreadable");
        fs::create_dir(d.join("locked")).unwrap();
        fs::write(d.join("locked/secret"), "x").unwrap();
        let before = Snapshot::take(&d);
        fs::set_permissions(d.join("locked"), fs::Permissions::from_mode(0o000)).unwrap();
        let after = Snapshot::take(&d);
        fs::set_permissions(d.join("locked"), fs::Permissions::from_mode(0o700)).unwrap();
        if after.unreadable.is_empty() {
            // Root reads through mode 000: nothing to check here.
            fs::remove_dir_all(&d).unwrap();
            return;
        }
        let c = before.diff(&after);
        assert_eq!(c.unreadable_dirs, 1);
        assert_eq!(c.deleted_count, Some(0), "{c:?}");
        fs::remove_dir_all(&d).unwrap();
    }
}
