//! Records: one mutating file operation each, named by paths relative to the volume root.
//!
//! A record is self-contained: it carries every value needed to replay it on another tree
//! (owner, final mode, concrete timestamps), so the source's backing volume and the
//! destination's image end up identical when both apply the same records in sequence order.

use serde::{Deserialize, Serialize};

pub use crate::handle::Handle;

/// A path relative to the volume root, as raw bytes (Linux file names need not be UTF-8).
/// The empty path names the root itself. See [`crate::path`] for the rules it must obey.
pub type RelPath = Vec<u8>;

/// A point in time as the kernel stores it; records carry concrete times (never "now")
/// so that replaying a record gives the same result everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    pub secs: i64,
    /// Nanoseconds within the second (0..1e9).
    pub nanos: u32,
}

/// One mutating file operation. Reads are never recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Create an empty regular file (fails if the name exists).
    Create {
        /// Where.
        #[serde(with = "serde_bytes")]
        path: RelPath,
        /// Permission bits (with setuid/setgid/sticky), umask already applied.
        mode: u32,
        /// Owner.
        uid: u32,
        /// Group (the source resolved the setgid-directory rule).
        gid: u32,
    },
    /// Create a special file: FIFO, socket, character or block device (`mode` holds the type).
    Mknod {
        /// Where.
        #[serde(with = "serde_bytes")]
        path: RelPath,
        /// File type and permission bits.
        mode: u32,
        /// Device number for device nodes.
        rdev: u64,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
    },
    /// Create a directory.
    Mkdir {
        /// Where.
        #[serde(with = "serde_bytes")]
        path: RelPath,
        /// Permission bits, umask applied, setgid inherited.
        mode: u32,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
    },
    /// Create a symbolic link.
    Symlink {
        /// Where the link is.
        #[serde(with = "serde_bytes")]
        path: RelPath,
        /// What it points to (stored verbatim, never resolved).
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
    },
    /// Add a hard link `new_path` to the file at `existing`.
    Link {
        /// A current name of the file.
        #[serde(with = "serde_bytes")]
        existing: RelPath,
        /// The new name.
        #[serde(with = "serde_bytes")]
        new_path: RelPath,
    },
    /// Remove a non-directory name.
    Unlink {
        /// The name.
        #[serde(with = "serde_bytes")]
        path: RelPath,
    },
    /// Remove an empty directory.
    Rmdir {
        /// The directory.
        #[serde(with = "serde_bytes")]
        path: RelPath,
    },
    /// `renameat2`, with its flags (RENAME_NOREPLACE, RENAME_EXCHANGE).
    Rename {
        /// Old name.
        #[serde(with = "serde_bytes")]
        from: RelPath,
        /// New name.
        #[serde(with = "serde_bytes")]
        to: RelPath,
        /// `renameat2` flags.
        flags: u32,
        /// The source's handle of the entry at `from`: recovery re-applying the one rename a
        /// power cut may have interrupted applies it only if `from` still holds that entry
        /// (an exchange applied twice would undo itself).
        #[serde(default)]
        handle: Handle,
    },
    /// Change attributes; absent fields stay as they are.
    SetAttr {
        /// The file.
        #[serde(with = "serde_bytes")]
        path: RelPath,
        /// New permission bits.
        mode: Option<u32>,
        /// New owner.
        uid: Option<u32>,
        /// New group.
        gid: Option<u32>,
        /// New size (truncate or extend).
        size: Option<u64>,
        /// New access time.
        atime: Option<Timestamp>,
        /// New modification time.
        mtime: Option<Timestamp>,
        /// The source's handle of the file, when `size` is set (a truncate is re-applied by
        /// handle at recovery, like a write).
        #[serde(default)]
        handle: Handle,
    },
    /// Write bytes at an offset of a regular file.
    Write {
        /// The file.
        #[serde(with = "serde_bytes")]
        path: RelPath,
        /// Byte offset.
        offset: u64,
        /// The bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        /// The source's handle of the file written (see [`crate::handle`]): start-up recovery
        /// re-applies the write to that inode wherever it is by then.
        #[serde(default)]
        handle: Handle,
    },
    /// `fallocate(2)` with its mode (allocate, keep size, punch hole, zero range).
    Fallocate {
        /// The file.
        #[serde(with = "serde_bytes")]
        path: RelPath,
        /// fallocate mode flags.
        mode: i32,
        /// Start.
        offset: u64,
        /// Length.
        length: u64,
        /// The source's handle of the file.
        #[serde(default)]
        handle: Handle,
    },
    /// Set an extended attribute.
    SetXattr {
        /// The file.
        #[serde(with = "serde_bytes")]
        path: RelPath,
        /// Attribute name, with its namespace prefix (`user.`...).
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        /// Value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// XATTR_CREATE / XATTR_REPLACE.
        flags: i32,
    },
    /// Remove an extended attribute.
    RemoveXattr {
        /// The file.
        #[serde(with = "serde_bytes")]
        path: RelPath,
        /// Attribute name.
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
    },
    /// Copy a byte range between two regular files of the same volume. Replaying it reads
    /// the source range from the tree being replayed, which holds the same bytes at this point
    /// of the sequence.
    CopyFileRange {
        /// File read from.
        #[serde(with = "serde_bytes")]
        src_path: RelPath,
        /// Offset read from.
        src_offset: u64,
        /// File written to.
        #[serde(with = "serde_bytes")]
        dst_path: RelPath,
        /// Offset written to.
        dst_offset: u64,
        /// Number of bytes the source copied.
        length: u64,
    },
    /// Make `path` exactly `entry`, whatever is there now (a directory recursively): the first
    /// record of a resync of one path (baseline, healing of a divergence, `verify --repair`).
    /// Content, xattrs and times of the entry follow as ordinary `Write`, `SetXattr` and
    /// `SetAttr` records. The source's backing volume already is that state, so only the image
    /// applies it.
    Replace {
        /// The path (empty: the root, which can only be a directory).
        #[serde(with = "serde_bytes")]
        path: RelPath,
        /// What it must be.
        entry: Entry,
    },
    /// Set the access and modification times of several entries (never following a final
    /// symlink): what one operation changed, logged with it so the image gets the source's
    /// times.
    Times {
        /// The entries and their times.
        entries: Vec<TimesEntry>,
    },
}

/// One entry of [`Op::Times`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimesEntry {
    /// The entry.
    #[serde(with = "serde_bytes")]
    pub path: RelPath,
    /// Its access time.
    pub atime: Timestamp,
    /// Its modification time.
    pub mtime: Timestamp,
    /// The source's handle of a regular file (its times are re-applied by handle at recovery,
    /// after the writes that changed them); none for other entries.
    #[serde(default)]
    pub handle: Handle,
}

/// What [`Op::Replace`] makes a path: an entry as it is on the source, without content, xattrs
/// or times (those follow in their own records).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    /// Nothing: whatever is at the path is removed.
    Absent,
    /// A directory. An existing directory is kept (its children too, unless `clear`); any
    /// other entry is replaced.
    Dir {
        /// Permission bits.
        mode: u32,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
        /// Remove every child first (a baseline starting over an image it must own).
        clear: bool,
    },
    /// A new, empty regular file (a new inode: hard links of whatever was there keep their
    /// content).
    File {
        /// Permission bits.
        mode: u32,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
    },
    /// A symbolic link.
    Symlink {
        /// Its target, verbatim.
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
    },
    /// A FIFO, socket or device node (`mode` holds the type).
    Special {
        /// File type and permission bits.
        mode: u32,
        /// Device number.
        rdev: u64,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
    },
}

impl Op {
    /// `SetAttr` of the permission bits only (a chmod; the source's own at a write that drops
    /// set-ID bits).
    pub fn chmod(path: RelPath, mode: u32) -> Op {
        Op::SetAttr {
            path,
            mode: Some(mode),
            uid: None,
            gid: None,
            size: None,
            atime: None,
            mtime: None,
            handle: Handle::none(),
        }
    }

    /// `SetAttr` of the access and modification times only: what the source logs so that the
    /// image gets its times (replaying a record stamps the replay's time).
    pub fn times(path: RelPath, atime: Timestamp, mtime: Timestamp) -> Op {
        Op::SetAttr {
            path,
            mode: None,
            uid: None,
            gid: None,
            size: None,
            atime: Some(atime),
            mtime: Some(mtime),
            handle: Handle::none(),
        }
    }

    /// True for the records that change the namespace (create, link, unlink, rename...): the
    /// ones recovery must apply exactly once, guided by the replay marker (see
    /// [`crate::replay`]).
    pub fn is_namespace(&self) -> bool {
        matches!(
            self,
            Op::Create { .. }
                | Op::Mknod { .. }
                | Op::Mkdir { .. }
                | Op::Symlink { .. }
                | Op::Link { .. }
                | Op::Unlink { .. }
                | Op::Rmdir { .. }
                | Op::Rename { .. }
                | Op::Replace { .. }
        )
    }

    /// True for the records that change a file's content or size, which a power cut can take
    /// from the page cache out of order with the namespace.
    pub fn is_data(&self) -> bool {
        matches!(
            self,
            Op::Write { .. }
                | Op::Fallocate { .. }
                | Op::CopyFileRange { .. }
                | Op::SetAttr { size: Some(_), .. }
        )
    }

    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Create { .. } => "create",
            Op::Mknod { .. } => "mknod",
            Op::Mkdir { .. } => "mkdir",
            Op::Symlink { .. } => "symlink",
            Op::Link { .. } => "link",
            Op::Unlink { .. } => "unlink",
            Op::Rmdir { .. } => "rmdir",
            Op::Rename { .. } => "rename",
            Op::SetAttr { .. } => "setattr",
            Op::Write { .. } => "write",
            Op::Fallocate { .. } => "fallocate",
            Op::SetXattr { .. } => "setxattr",
            Op::RemoveXattr { .. } => "removexattr",
            Op::CopyFileRange { .. } => "copy_file_range",
            Op::Replace { .. } => "replace",
            Op::Times { .. } => "times",
        }
    }

    /// Every path the record names, so each can be validated before anything is applied.
    pub fn paths(&self) -> Vec<&[u8]> {
        match self {
            Op::Create { path, .. }
            | Op::Mknod { path, .. }
            | Op::Mkdir { path, .. }
            | Op::Symlink { path, .. }
            | Op::Unlink { path }
            | Op::Rmdir { path }
            | Op::SetAttr { path, .. }
            | Op::Write { path, .. }
            | Op::Fallocate { path, .. }
            | Op::SetXattr { path, .. }
            | Op::RemoveXattr { path, .. }
            | Op::Replace { path, .. } => vec![path],
            Op::Link { existing, new_path } => vec![existing, new_path],
            Op::Rename { from, to, .. } => vec![from, to],
            Op::CopyFileRange {
                src_path, dst_path, ..
            } => vec![src_path, dst_path],
            Op::Times { entries } => entries.iter().map(|e| e.path.as_slice()).collect(),
        }
    }

    /// Encode with MessagePack (rmp-serde), the payload format of a frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len_hint());
        self.encode_into(&mut out);
        out
    }

    /// Append the MessagePack encoding to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        // Encoding plain enums/structs/byte strings into a Vec cannot fail.
        rmp_serde::encode::write(out, self).expect("encoding a record into memory cannot fail");
    }

    /// Decode a payload produced by [`Op::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Op, rmp_serde::decode::Error> {
        rmp_serde::from_slice(bytes)
    }

    /// Decode a payload like [`Op::decode`], except that a write comes back with empty `data`
    /// and the range of `bytes` that holds its data: a CP keeps the metadata of its whole
    /// window in memory and reads each write's bytes back from the journal only when it applies
    /// them, so its memory does not grow with the window's payload.
    pub fn decode_lean(
        bytes: &[u8],
    ) -> Result<(Op, Option<std::ops::Range<usize>>), rmp_serde::decode::Error> {
        /// Same variant names and positions as `Op` up to `Write` (the other variants' content
        /// is skipped; a variant after `Write` fails here and is decoded in full instead).
        #[derive(Deserialize)]
        #[allow(dead_code)]
        enum OpPeek<'a> {
            Create(serde::de::IgnoredAny),
            Mknod(serde::de::IgnoredAny),
            Mkdir(serde::de::IgnoredAny),
            Symlink(serde::de::IgnoredAny),
            Link(serde::de::IgnoredAny),
            Unlink(serde::de::IgnoredAny),
            Rmdir(serde::de::IgnoredAny),
            Rename(serde::de::IgnoredAny),
            SetAttr(serde::de::IgnoredAny),
            Write {
                #[serde(borrow, with = "serde_bytes")]
                path: &'a [u8],
                offset: u64,
                #[serde(borrow, with = "serde_bytes")]
                data: &'a [u8],
                #[serde(default)]
                handle: Handle,
            },
        }
        if let Ok(OpPeek::Write {
            path,
            offset,
            data,
            handle,
        }) = rmp_serde::from_slice::<OpPeek>(bytes)
        {
            // `data` borrows from `bytes`: its position is the distance between the two.
            let start = data.as_ptr() as usize - bytes.as_ptr() as usize;
            if start + data.len() <= bytes.len() {
                let op = Op::Write {
                    path: path.to_vec(),
                    offset,
                    data: Vec::new(),
                    handle,
                };
                return Ok((op, Some(start..start + data.len())));
            }
        }
        Ok((Op::decode(bytes)?, None))
    }

    /// Encode a write record straight from borrowed bytes, giving exactly the bytes
    /// `Op::Write { path, offset, data }.encode()` would, without first copying `data` into an
    /// owned `Op` (the hot path of large writes).
    pub fn encode_write_into(
        out: &mut Vec<u8>,
        path: &[u8],
        offset: u64,
        data: &[u8],
        handle: &Handle,
    ) {
        /// Same variant names and positions as `Op` up to `Write`, so the encoding is identical
        /// (checked by a test).
        #[derive(Serialize)]
        #[allow(dead_code)]
        enum OpRef<'a> {
            Create,
            Mknod,
            Mkdir,
            Symlink,
            Link,
            Unlink,
            Rmdir,
            Rename,
            SetAttr,
            Write {
                #[serde(with = "serde_bytes")]
                path: &'a [u8],
                offset: u64,
                #[serde(with = "serde_bytes")]
                data: &'a [u8],
                handle: &'a Handle,
            },
        }
        out.reserve(48 + path.len() + data.len());
        rmp_serde::encode::write(
            out,
            &OpRef::Write {
                path,
                offset,
                data,
                handle,
            },
        )
        .expect("encoding a record into memory cannot fail");
    }

    /// A capacity guess that avoids reallocation for data-carrying records.
    pub fn encoded_len_hint(&self) -> usize {
        match self {
            Op::Write { path, data, .. } => 32 + path.len() + data.len(),
            Op::SetXattr {
                path, name, value, ..
            } => 32 + path.len() + name.len() + value.len(),
            _ => 128,
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn lean_decoding_locates_a_writes_data_and_leaves_other_records_whole() {
        let data: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        for len in [0usize, 1, 200, 300, 70_000] {
            let op = Op::Write {
                path: b"dir/file".to_vec(),
                offset: 12345,
                data: data[..len].to_vec(),
                handle: Handle(vec![7; 12]),
            };
            let bytes = op.encode();
            let (lean, range) = Op::decode_lean(&bytes).expect("decodes");
            let range = range.expect("a write has a data range");
            assert_eq!(
                &bytes[range],
                &data[..len],
                "the range holds the data ({len} bytes)"
            );
            assert_eq!(
                lean,
                Op::Write {
                    path: b"dir/file".to_vec(),
                    offset: 12345,
                    data: Vec::new(),
                    handle: Handle(vec![7; 12]),
                }
            );
        }
        for op in [
            Op::Unlink {
                path: b"a".to_vec(),
            },
            Op::Times { entries: vec![] },
        ] {
            let (lean, range) = Op::decode_lean(&op.encode()).expect("decodes");
            assert_eq!((lean, range), (op, None));
        }
        assert!(Op::decode_lean(b"\xc1garbage").is_err());
    }
    use super::*;
    use proptest::prelude::*;

    fn bytes() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..64)
    }

    fn ts() -> impl Strategy<Value = Timestamp> {
        (any::<i64>(), 0u32..1_000_000_000).prop_map(|(secs, nanos)| Timestamp { secs, nanos })
    }

    fn any_entry() -> impl Strategy<Value = Entry> {
        prop_oneof![
            Just(Entry::Absent),
            (any::<u32>(), any::<u32>(), any::<u32>(), any::<bool>()).prop_map(
                |(mode, uid, gid, clear)| Entry::Dir {
                    mode,
                    uid,
                    gid,
                    clear
                }
            ),
            (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(mode, uid, gid)| Entry::File {
                mode,
                uid,
                gid
            }),
            (bytes(), any::<u32>(), any::<u32>()).prop_map(|(target, uid, gid)| Entry::Symlink {
                target,
                uid,
                gid
            }),
            (any::<u32>(), any::<u64>(), any::<u32>(), any::<u32>()).prop_map(
                |(mode, rdev, uid, gid)| Entry::Special {
                    mode,
                    rdev,
                    uid,
                    gid
                }
            ),
        ]
    }

    pub(crate) fn any_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (bytes(), any::<u32>(), any::<u32>(), any::<u32>()).prop_map(
                |(path, mode, uid, gid)| Op::Create {
                    path,
                    mode,
                    uid,
                    gid
                }
            ),
            (
                bytes(),
                any::<u32>(),
                any::<u64>(),
                any::<u32>(),
                any::<u32>()
            )
                .prop_map(|(path, mode, rdev, uid, gid)| Op::Mknod {
                    path,
                    mode,
                    rdev,
                    uid,
                    gid
                }),
            (bytes(), any::<u32>(), any::<u32>(), any::<u32>()).prop_map(
                |(path, mode, uid, gid)| Op::Mkdir {
                    path,
                    mode,
                    uid,
                    gid
                }
            ),
            (bytes(), bytes(), any::<u32>(), any::<u32>()).prop_map(|(path, target, uid, gid)| {
                Op::Symlink {
                    path,
                    target,
                    uid,
                    gid,
                }
            }),
            (bytes(), bytes()).prop_map(|(existing, new_path)| Op::Link { existing, new_path }),
            bytes().prop_map(|path| Op::Unlink { path }),
            bytes().prop_map(|path| Op::Rmdir { path }),
            (bytes(), bytes(), any::<u32>()).prop_map(|(from, to, flags)| Op::Rename {
                from,
                to,
                flags,
                handle: Handle::none()
            }),
            (
                bytes(),
                any::<Option<u32>>(),
                any::<Option<u32>>(),
                any::<Option<u32>>(),
                any::<Option<u64>>(),
                proptest::option::of(ts()),
                proptest::option::of(ts())
            )
                .prop_map(|(path, mode, uid, gid, size, atime, mtime)| Op::SetAttr {
                    path,
                    mode,
                    uid,
                    gid,
                    size,
                    atime,
                    mtime,
                    handle: Handle(vec![1, 0, 0, 0, 7, 7]),
                }),
            (
                bytes(),
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 0..4096)
            )
                .prop_map(|(path, offset, data)| Op::Write {
                    path,
                    offset,
                    data,
                    handle: Handle(vec![1, 0, 0, 0, 9])
                }),
            (bytes(), any::<i32>(), any::<u64>(), any::<u64>()).prop_map(
                |(path, mode, offset, length)| Op::Fallocate {
                    path,
                    mode,
                    offset,
                    length,
                    handle: Handle::none()
                }
            ),
            (bytes(), bytes(), bytes(), any::<i32>()).prop_map(|(path, name, value, flags)| {
                Op::SetXattr {
                    path,
                    name,
                    value,
                    flags,
                }
            }),
            (bytes(), bytes()).prop_map(|(path, name)| Op::RemoveXattr { path, name }),
            (bytes(), any_entry()).prop_map(|(path, entry)| Op::Replace { path, entry }),
            proptest::collection::vec((bytes(), ts(), ts()), 0..4).prop_map(|v| Op::Times {
                entries: v
                    .into_iter()
                    .map(|(path, atime, mtime)| TimesEntry {
                        path,
                        atime,
                        mtime,
                        handle: Handle::none()
                    })
                    .collect()
            }),
            (bytes(), any::<u64>(), bytes(), any::<u64>(), any::<u64>()).prop_map(
                |(src_path, src_offset, dst_path, dst_offset, length)| Op::CopyFileRange {
                    src_path,
                    src_offset,
                    dst_path,
                    dst_offset,
                    length
                }
            ),
        ]
    }

    proptest! {
        #[test]
        fn every_op_round_trips(op in any_op()) {
            prop_assert_eq!(Op::decode(&op.encode()).unwrap(), op);
        }

        #[test]
        fn borrowed_write_encoding_is_identical(path in bytes(), offset: u64, data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut fast = Vec::new();
            let handle = Handle(path.clone());
            Op::encode_write_into(&mut fast, &path, offset, &data, &handle);
            prop_assert_eq!(fast, Op::Write { path, offset, data, handle }.encode());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Op::decode(&bytes);
        }
    }
}
