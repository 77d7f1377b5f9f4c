# Rewrite a .cu for the host emulation: kernel launches and the dynamic shared-memory array.
undef $/;
my $s = <>;
$s =~ s/#include <mma.h>//g;
$s =~ s/extern __shared__ __align__\(128\) unsigned char smem\[\];/unsigned char* smem = emu_dynamic_smem();/g;
$s =~ s/([\w:]+(?:<[^;<>]*>)?)\s*<<<(.*?)>>>\s*\(/emu::launch($1, $2)(/gs;
print $s;
