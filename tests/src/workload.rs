//! A mixed workload of every mutating operation the mirror logs, run through any directory.
//!
//! Tests run it twice with the same seed: once in a plain reference directory on a local
//! filesystem, once through the FUSE mount. The mount must then look exactly like the reference
//! (the mount behaves like a local filesystem) and the destination's image exactly like the
//! backing volume (the mirror is exact). The workload also checks a few results on the spot
//! (errors that must happen, contents that must be read back) so that a difference is caught
//! where it starts.
//!
//! Needs root: it chowns files to other users.

use crate::Rng;
use rustix::fs::{FallocateFlags, FileType, Mode, RenameFlags, XattrFlags, CWD};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{lchown, symlink, FileExt, PermissionsExt};
use std::path::Path;

const MIB: usize = 1 << 20;

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {:o} {}: {e}", mode, path.display()));
}

fn write_file(path: &Path, data: &[u8]) {
    fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn read_file(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn rename_with(from: &Path, to: &Path, flags: RenameFlags) -> rustix::io::Result<()> {
    rustix::fs::renameat_with(CWD, from, CWD, to, flags)
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    rustix::fs::setxattr(path, name, value, XattrFlags::empty())
        .unwrap_or_else(|e| panic!("setxattr {name} {}: {e}", path.display()));
}

/// Writes `data` to `file` at `offset` in pieces of random size (4 KiB to 1 MiB), as an
/// application streaming a file does.
fn write_in_pieces(file: &File, mut offset: u64, data: &[u8], rng: &mut Rng) {
    let mut done = 0;
    while done < data.len() {
        let piece = (4096 + rng.below(MIB as u64) as usize).min(data.len() - done);
        file.write_all_at(&data[done..done + piece], offset)
            .expect("write piece");
        done += piece;
        offset += piece as u64;
    }
}

/// Applies a pwrite to the model of a file's content.
fn model_write(model: &mut Vec<u8>, offset: usize, data: &[u8]) {
    if model.len() < offset + data.len() {
        model.resize(offset + data.len(), 0);
    }
    model[offset..offset + data.len()].copy_from_slice(data);
}

/// Runs the workload beneath `root` (which must exist and be empty). Deterministic for a given
/// `rng` state.
pub fn mixed(root: &Path, rng: &mut Rng) {
    let p = |rel: &str| root.join(rel);

    // Nested directories and small files.
    fs::create_dir_all(p("a/b/c")).expect("mkdir -p a/b/c");
    fs::create_dir_all(p("d/sub")).expect("mkdir -p d/sub");
    write_file(&p("a/small.txt"), b"small file\n");
    write_file(&p("a/b/c/deep.txt"), &rng.bytes(1000));
    write_file(&p("d/sub/inner.txt"), b"inner\n");
    for i in 0..40 {
        let len = rng.below(3000) as usize;
        write_file(&p(&format!("d/f{i:03}")), &rng.bytes(len));
    }

    // A large file written in pieces, then overwritten at random offsets (some past the end).
    let big_len = 3 * MIB + rng.below(100_000) as usize;
    let mut big_model = rng.bytes(big_len);
    {
        let f = File::create(p("big.bin")).expect("create big.bin");
        write_in_pieces(&f, 0, &big_model, rng);
        for _ in 0..20 {
            let offset = rng.below(big_model.len() as u64 + 5000) as usize;
            let len = 1 + rng.below(70_000) as usize;
            let data = rng.bytes(len);
            f.write_all_at(&data, offset as u64)
                .expect("overwrite big.bin");
            model_write(&mut big_model, offset, &data);
        }
    }
    assert!(
        read_file(&p("big.bin")) == big_model,
        "{}: big.bin does not read back as written",
        root.display()
    );

    // Truncate shorter, then longer (a sparse extension reading as zeros).
    write_file(&p("trunc.bin"), &rng.bytes(100_000));
    {
        let f = OpenOptions::new()
            .write(true)
            .open(p("trunc.bin"))
            .expect("open trunc.bin");
        f.set_len(1234).expect("truncate shorter");
        f.set_len(200_000).expect("truncate longer");
    }
    let t = read_file(&p("trunc.bin"));
    assert_eq!(t.len(), 200_000, "trunc.bin size");
    assert!(
        t[1234..].iter().all(|&b| b == 0),
        "truncate-extended part is not zero"
    );
    fs::File::create(p("emptied.txt"))
        .and_then(|mut f| f.write_all(b"will be truncated to zero"))
        .expect("create emptied.txt");
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(p("emptied.txt"))
        .expect("O_TRUNC emptied.txt");

    // Rename a file and a whole directory (with contents).
    fs::rename(p("a/small.txt"), p("a/b/renamed.txt")).expect("rename file");
    fs::rename(p("d"), p("a/moved_d")).expect("rename directory");
    fs::rename(p("a/moved_d/f000"), p("a/moved_d/f001")).expect("rename over existing file");

    // RENAME_NOREPLACE: refused onto an existing name, allowed onto a new one.
    write_file(&p("x.txt"), b"this is x\n");
    write_file(&p("y.txt"), b"this is y, longer\n");
    let err = rename_with(&p("x.txt"), &p("y.txt"), RenameFlags::NOREPLACE)
        .expect_err("RENAME_NOREPLACE onto an existing file must fail");
    assert_eq!(err, rustix::io::Errno::EXIST, "RENAME_NOREPLACE error");
    write_file(&p("n.txt"), b"noreplace\n");
    rename_with(&p("n.txt"), &p("a/n-moved.txt"), RenameFlags::NOREPLACE)
        .expect("RENAME_NOREPLACE onto a new name");

    // RENAME_EXCHANGE: two files, then a file and a directory.
    rename_with(&p("x.txt"), &p("y.txt"), RenameFlags::EXCHANGE).expect("RENAME_EXCHANGE files");
    assert_eq!(read_file(&p("x.txt")), b"this is y, longer\n");
    assert_eq!(read_file(&p("y.txt")), b"this is x\n");
    write_file(&p("swap_a"), b"was a file\n");
    fs::create_dir(p("swap_b")).expect("mkdir swap_b");
    write_file(&p("swap_b/inside"), b"inside the dir\n");
    rename_with(&p("swap_a"), &p("swap_b"), RenameFlags::EXCHANGE)
        .expect("RENAME_EXCHANGE file and dir");
    assert_eq!(read_file(&p("swap_a/inside")), b"inside the dir\n");
    assert_eq!(read_file(&p("swap_b")), b"was a file\n");

    // Hard links: a group of three, and a group that loses its first name.
    fs::hard_link(p("big.bin"), p("a/big.link")).expect("link big.bin");
    fs::hard_link(p("big.bin"), p("a/b/big.link2")).expect("link big.bin again");
    fs::hard_link(p("a/b/c/deep.txt"), p("deep.link")).expect("link deep.txt");
    fs::remove_file(p("a/b/c/deep.txt")).expect("unlink first name of a link group");
    // Writing through one name is seen through the other.
    OpenOptions::new()
        .append(true)
        .open(p("a/big.link"))
        .and_then(|mut f| f.write_all(b"appended through a link"))
        .expect("append through a link");
    big_model.extend_from_slice(b"appended through a link");

    // Symlinks: relative, dangling, absolute, to a directory.
    symlink("a/b/renamed.txt", p("to_renamed")).expect("symlink");
    symlink("does/not/exist", p("dangling")).expect("dangling symlink");
    symlink("/etc/hostname", p("absolute")).expect("absolute symlink");
    symlink("a/moved_d", p("to_dir")).expect("symlink to dir");
    assert_eq!(read_file(&p("to_renamed")), b"small file\n");

    // Ownership (root gives files away), then modes incl. setuid, setgid and sticky.
    write_file(&p("owned.txt"), b"belongs to 1234\n");
    lchown(p("owned.txt"), Some(1234), Some(5678)).expect("chown file");
    lchown(p("dangling"), Some(777), Some(778)).expect("lchown symlink");
    lchown(p("a/moved_d"), Some(4321), None).expect("chown dir (uid only)");
    write_file(&p("setuid.bin"), b"#!/bin/true\n");
    lchown(p("setuid.bin"), Some(1000), Some(1000)).expect("chown setuid.bin");
    chmod(&p("setuid.bin"), 0o4755);
    chmod(&p("x.txt"), 0o640);
    chmod(&p("y.txt"), 0o600);
    fs::create_dir(p("sgid")).expect("mkdir sgid");
    lchown(p("sgid"), None, Some(5000)).expect("chgrp sgid");
    chmod(&p("sgid"), 0o2775);
    // Created inside a setgid directory: group of the directory, subdirectories inherit setgid.
    write_file(&p("sgid/child.txt"), b"group from the dir\n");
    fs::create_dir(p("sgid/subdir")).expect("mkdir in setgid dir");
    fs::create_dir(p("sticky")).expect("mkdir sticky");
    chmod(&p("sticky"), 0o1777);
    chmod(&p("a/b/c"), 0o700);

    // Extended attributes: set, replace, remove; on a file and on a directory.
    set_xattr(&p("x.txt"), "user.one", b"1");
    set_xattr(&p("x.txt"), "user.two", b"two");
    set_xattr(&p("x.txt"), "user.three", &rng.bytes(300));
    set_xattr(&p("x.txt"), "user.one", b"replaced");
    rustix::fs::removexattr(p("x.txt"), "user.two").expect("removexattr");
    set_xattr(&p("a/b"), "user.dir", b"on a directory");

    // A FIFO (mknod).
    rustix::fs::mknodat(
        CWD,
        p("a/fifo"),
        FileType::Fifo,
        Mode::from_raw_mode(0o640),
        0,
    )
    .expect("mkfifo");

    // Unlink and rmdir.
    fs::remove_file(p("a/moved_d/f002")).expect("unlink");
    fs::remove_dir(p("a/moved_d/sub")).expect_err("rmdir of a non-empty dir must fail");
    fs::remove_file(p("a/moved_d/sub/inner.txt")).expect("unlink inner");
    fs::remove_dir(p("a/moved_d/sub")).expect("rmdir");

    // A file unlinked while open keeps working for its holder, then disappears.
    {
        let mut f = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(true)
            .open(p("open-unlinked.txt"))
            .expect("create open-unlinked.txt");
        f.write_all(b"before unlink;").expect("write before unlink");
        fs::remove_file(p("open-unlinked.txt")).expect("unlink open file");
        assert!(
            !p("open-unlinked.txt").exists(),
            "unlinked name still resolves"
        );
        f.write_all(b" after unlink").expect("write after unlink");
        let mut all = vec![0u8; 27];
        f.read_exact_at(&mut all, 0).expect("read unlinked file");
        assert_eq!(&all, b"before unlink; after unlink");
        f.sync_all().expect("fsync unlinked file");
    }

    // fallocate: extend, allocate past the end keeping the size, punch a hole.
    {
        let f = File::create(p("falloc.bin")).expect("create falloc.bin");
        rustix::fs::fallocate(&f, FallocateFlags::empty(), 0, 256 * 1024).expect("fallocate");
        rustix::fs::fallocate(&f, FallocateFlags::KEEP_SIZE, 256 * 1024, 64 * 1024)
            .expect("fallocate KEEP_SIZE");
        f.write_all_at(&rng.bytes(10_000), 5000)
            .expect("write into falloc.bin");
        assert_eq!(f.metadata().unwrap().len(), 256 * 1024, "falloc.bin size");
    }
    {
        let f = OpenOptions::new()
            .write(true)
            .open(p("big.bin"))
            .expect("open big.bin");
        let offset = 4096 * (1 + rng.below(200));
        let len = 4096 * (1 + rng.below(64));
        rustix::fs::fallocate(
            &f,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )
        .expect("fallocate PUNCH_HOLE");
        big_model[offset as usize..(offset + len) as usize].fill(0);
    }
    assert!(
        read_file(&p("big.bin")) == big_model,
        "{}: big.bin wrong after punch hole",
        root.display()
    );

    // copy_file_range: part of big.bin into a new file, at an offset.
    {
        let src = File::open(p("big.bin")).expect("open big.bin");
        let dst = File::create(p("copied.bin")).expect("create copied.bin");
        let mut off_in = rng.below(MIB as u64);
        let mut off_out = 1000u64;
        let len = 100_000 + rng.below(MIB as u64) as usize;
        let expected = big_model[off_in as usize..off_in as usize + len].to_vec();
        let mut left = len;
        while left > 0 {
            let n = rustix::fs::copy_file_range(
                &src,
                Some(&mut off_in),
                &dst,
                Some(&mut off_out),
                left,
            )
            .expect("copy_file_range");
            assert!(n > 0, "copy_file_range copied nothing");
            left -= n;
        }
        let got = read_file(&p("copied.bin"));
        assert_eq!(got.len(), 1000 + len, "copied.bin size");
        assert!(
            got[..1000].iter().all(|&b| b == 0),
            "copied.bin head not zero"
        );
        assert!(got[1000..] == expected[..], "copied.bin content wrong");
    }

    // Some churn at the end: create and delete, overwrite small files.
    for i in 0..20 {
        let name = p(&format!("a/churn{i}"));
        let len = rng.below(5000) as usize;
        write_file(&name, &rng.bytes(len));
        if rng.below(2) == 0 {
            fs::remove_file(&name).expect("unlink churn");
        }
    }
}
