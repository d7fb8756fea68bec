//! The "floor" initramfs: the least a guest can do. Its `/init` is a 200-byte static x86-64 ELF that
//! writes one marker line to the console and powers the machine off with `reboot(2)`. Booting it
//! measures VMM start + kernel boot with nothing of hearth's (the benchmark's baseline) and proves
//! that an accelerator really boots guests (the KVM probe). Hand-assembled so that it needs no
//! toolchain, libc or busybox on the host.
//!
//! Never run the binary on the host: as root it would power the host off.

use std::path::{Path, PathBuf};

use super::{InitramfsBuilder, InitramfsError};

/// The line the floor's `/init` writes to the console before powering off.
pub const FLOOR_MARKER: &str = "hearth-floor: init reached";

const BASE: u64 = 0x40_0000;
const EHDR_LEN: usize = 64;
const PHDR_LEN: usize = 56;

/// Builds (or reuses) the floor initramfs under `$home/initramfs/`.
pub fn floor_initramfs(home: &Path) -> Result<PathBuf, InitramfsError> {
    let mut builder = InitramfsBuilder::new();
    builder.file("init", 0o755, floor_init_elf());
    builder.write_cached(home)
}

/// The floor's `/init`: write(1, FLOOR_MARKER "\n"), reboot(POWER_OFF), spin.
pub fn floor_init_elf() -> Vec<u8> {
    let message = format!("{FLOOR_MARKER}\n");
    let code_start = EHDR_LEN + PHDR_LEN;
    let mut code: Vec<u8> = Vec::new();
    let imm = |code: &mut Vec<u8>, opcode: u8, value: u32| {
        code.push(opcode);
        code.extend_from_slice(&value.to_le_bytes());
    };
    imm(&mut code, 0xb8, 1); // mov eax, SYS_write
    imm(&mut code, 0xbf, 1); // mov edi, 1 (stdout = /dev/console)
    code.extend_from_slice(&[0x48, 0x8d, 0x35]); // lea rsi, [rip + rel32]
    let rel32_at = code.len();
    code.extend_from_slice(&[0; 4]);
    let after_lea = code.len();
    imm(&mut code, 0xba, message.len() as u32); // mov edx, len
    code.extend_from_slice(&[0x0f, 0x05]); // syscall
    imm(&mut code, 0xb8, 169); // mov eax, SYS_reboot
    imm(&mut code, 0xbf, 0xfee1_dead); // LINUX_REBOOT_MAGIC1
    imm(&mut code, 0xbe, 0x2812_1969); // LINUX_REBOOT_MAGIC2
    imm(&mut code, 0xba, 0x4321_fedc); // LINUX_REBOOT_CMD_POWER_OFF
    code.extend_from_slice(&[0x0f, 0x05]); // syscall
    code.extend_from_slice(&[0xeb, 0xfe]); // jmp . (never returns: exiting PID 1 panics)
    let rel = (code.len() - after_lea) as u32;
    code[rel32_at..rel32_at + 4].copy_from_slice(&rel.to_le_bytes());
    code.extend_from_slice(message.as_bytes());

    let file_len = (code_start + code.len()) as u64;
    let mut elf = Vec::with_capacity(file_len as usize);
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0"); // 64-bit, LE, SysV
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    elf.extend_from_slice(&(BASE + code_start as u64).to_le_bytes()); // e_entry
    elf.extend_from_slice(&(EHDR_LEN as u64).to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for half in [EHDR_LEN as u16, PHDR_LEN as u16, 1, 0, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes()); // ehsize, phentsize, phnum, sh*
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // PF_R | PF_X
    for word in [0, BASE, BASE, file_len, file_len, 0x1000] {
        elf.extend_from_slice(&word.to_le_bytes()); // offset, vaddr, paddr, filesz, memsz, align
    }
    elf.extend_from_slice(&code);
    elf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_init_is_a_loadable_elf_whose_message_is_where_the_code_points() {
        let elf = floor_init_elf();
        assert!(elf.starts_with(b"\x7fELF\x02\x01"));
        let entry = u64::from_le_bytes(elf[24..32].try_into().unwrap()) - BASE;
        assert_eq!(entry as usize, EHDR_LEN + PHDR_LEN);
        // lea rsi, [rip + rel32] at entry+10; rip is the next instruction (entry+17).
        let lea = entry as usize + 10;
        assert_eq!(&elf[lea..lea + 3], &[0x48, 0x8d, 0x35]);
        let rel = u32::from_le_bytes(elf[lea + 3..lea + 7].try_into().unwrap()) as usize;
        let message = &elf[lea + 7 + rel..];
        assert_eq!(message, format!("{FLOOR_MARKER}\n").as_bytes());
        assert!(elf.len() < 256);
    }
}
