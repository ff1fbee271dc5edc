/*
 * vmfork's built-in guest: a tiny x86-64 program that runs a memory workload in ring 3.
 *
 * Assembled by build.rs (`as --64`, then `objcopy -O binary -j .text`) into a flat binary
 * the VMM copies to GUEST_CODE (see src/vmm/guest/mod.rs, which holds every address used
 * here). The VMM builds the page tables and GDT, puts the vCPU in 64-bit long mode and
 * starts it at `user_entry` directly in ring 3 (CS.DPL=3), so every instruction of the
 * workload runs at native speed on PVM-based KVM. Port writes go through `pio_out` (see
 * there: an MMIO window the VMM forwards to its port bus). `_start`
 * (offset 0) is a ring-0 entry kept for hosts that cannot start a vCPU in ring 3: the VMM
 * builds an iretq frame on the stack and it drops to ring 3.
 *
 * Entry registers (set by the VMM): rdi = vCPU index, rsi = this vCPU's parameter block,
 * rbp = this vCPU's mailbox, rsp = this vCPU's user stack.
 *
 * Parameter block (u64 each): +0 mode, +8 area base (guest-physical = virtual),
 * +16 area pages, +24 iterations between reports, +32 random seed.
 * Modes: 0 count, 1 touch sequential, 2 touch random, 3 idle, 4 exit (i8042 reset).
 *
 * Report (one at entry, then every N iterations): the guest fills its mailbox (+0 counter,
 * +8 checksum, +16/+24 generation id read from GENID_GPA at that moment, +32 report
 * sequence number, +40 reseeds) and writes its vCPU index to REPORT_PORT: one VM exit
 * per report, the VMM reads the mailbox.
 *
 * Reseed: when the generation id differs from the one of the previous report, the VM
 * was forked (or restored as a new VM): like Linux's vmgenid driver, the guest mixes the
 * fresh entropy the VMM wrote at ENTROPY_GPA into its random state, so a parent and its
 * children never go on drawing the same random numbers (touch_rand's page choice).
 * Idle: the guest reports, then writes to IDLE_PORT; the VMM parks the vCPU until it is
 * paused, resumed or stopped, and the guest then reports and idles again.
 *
 * Checksum: every touched page holds a u64 counting its touches; after each touch
 * checksum = (checksum ^ new value) * 0x100000001b3 (mod 2^64). In count mode the same
 * with the counter, at each report. Both are pure functions of the counter (for a given seed), so a
 * paused, captured and restored VM must continue the exact same sequence.
 */
        .intel_syntax noprefix
        .code64
        .text

        .set GENID_GPA,   0x4000
        .set ENTROPY_GPA, 0x4100
        .set REPORT_PORT, 0x0700
        .set IDLE_PORT,   0x0701
        .set SERIAL_PORT, 0x03f8
        .set I8042_CMD,   0x0064
        .set PIO_MMIO_VA, 0x1010000000     /* PIO_MMIO_BASE as the page tables map it */

        .global _start
_start:                         /* offset 0: ring-0 entry */
        iretq

        .org 0x10
user_entry:                     /* offset 0x10: ring-3 entry */
        mov     r8,  [rsi + 0]          /* mode */
        mov     r9,  [rsi + 8]          /* area base */
        mov     r10, [rsi + 16]         /* area pages */
        mov     r11, [rsi + 24]         /* iterations between reports */
        mov     r12, [rsi + 32]         /* random state */
        xor     r13, r13                /* counter */
        xor     r14, r14                /* checksum */
        movabs  r15, 0x100000001b3      /* checksum multiplier (FNV-1a's prime) */
        test    edi, edi
        jnz     1f
        call    banner
1:      call    report                  /* first report: the guest is up */
        cmp     r8, 0
        je      count
        cmp     r8, 1
        je      touch_seq
        cmp     r8, 2
        je      touch_rand
        cmp     r8, 3
        je      idle
        cmp     r8, 4
        je      reset
        ud2

count:
        mov     rcx, r11
2:      dec     rcx
        jnz     2b
        add     r13, r11
        xor     r14, r13
        imul    r14, r15
        call    report
        jmp     count

touch_seq:
        xor     rbx, rbx                /* page index */
        mov     rcx, r11
3:      mov     rax, rbx
        shl     rax, 12
        add     rax, r9
        mov     rdx, [rax]
        inc     rdx
        mov     [rax], rdx
        xor     r14, rdx
        imul    r14, r15
        inc     r13
        inc     rbx
        cmp     rbx, r10
        jb      4f
        xor     rbx, rbx
4:      dec     rcx
        jnz     3b
        call    report
        mov     rcx, r11
        jmp     3b

touch_rand:
        mov     rcx, r11
5:      mov     rax, r12                /* xorshift64 */
        shl     rax, 13
        xor     r12, rax
        mov     rax, r12
        shr     rax, 7
        xor     r12, rax
        mov     rax, r12
        shl     rax, 17
        xor     r12, rax
        mov     rax, r12
        xor     edx, edx
        div     r10                     /* rdx = page index */
        shl     rdx, 12
        add     rdx, r9
        mov     rax, [rdx]
        inc     rax
        mov     [rdx], rax
        xor     r14, rax
        imul    r14, r15
        inc     r13
        dec     rcx
        jnz     5b
        call    report
        jmp     touch_rand

idle:
        call    report
        mov     dx, IDLE_PORT
        mov     eax, edi
        call    pio_out
        jmp     idle

reset:
        call    report
        mov     dx, I8042_CMD
        mov     al, 0xfe
        call    pio_out
        jmp     reset

/* Fills the mailbox and signals the VMM. Preserves every register but flags. */
report:
        push    rax
        push    rdx
        mov     [rbp + 0], r13
        mov     [rbp + 8], r14
        mov     rax, [GENID_GPA]
        mov     rdx, [GENID_GPA + 8]
        cmp     rax, [rbp + 16]
        jne     8f
        cmp     rdx, [rbp + 24]
        je      9f
8:      call    reseed
9:      mov     [rbp + 16], rax
        mov     [rbp + 24], rdx
        inc     qword ptr [rbp + 32]
        mov     dx, REPORT_PORT
        mov     eax, edi
        call    pio_out
        pop     rdx
        pop     rax
        ret

/* A new generation: r12 ^= this vCPU's quarter of the entropy (never leaving 0). */
reseed:
        push    rcx
        mov     ecx, edi
        and     ecx, 3
        xor     r12, [ENTROPY_GPA + rcx * 8]
        jnz     1f
        inc     r12
1:      inc     qword ptr [rbp + 40]
        pop     rcx
        ret

/*
 * Port write from ring 3: dx = port, al = value. Measured on PVM-based KVM: `out` in
 * ring 3 raises #GP even with RFLAGS.IOPL=3, and `syscall` does not reach a ring-0 LSTAR
 * stub. A store to guest-physical PIO_MMIO_BASE + port (no memory slot there; the page
 * tables map it at PIO_MMIO_VA) exits to the VMM as MMIO from any ring, and the VMM
 * forwards it to its port bus as `out`.
 */
pio_out:
        push    rdx
        push    rcx
        movzx   edx, dx
        movabs  rcx, PIO_MMIO_VA
        add     rdx, rcx
        mov     [rdx], al
        pop     rcx
        pop     rdx
        ret

/* Writes the banner to the serial port (vCPU 0 only). */
banner:
        push    rax
        push    rdx
        push    rbx
        lea     rbx, [rip + banner_text]
        mov     dx, SERIAL_PORT
6:      mov     al, [rbx]
        test    al, al
        jz      7f
        call    pio_out
        inc     rbx
        jmp     6b
7:      pop     rbx
        pop     rdx
        pop     rax
        ret

banner_text:
        .asciz  "vmfork guest: running in ring 3\n"
