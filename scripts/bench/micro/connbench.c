// connbench: N loopback connections (connect, request, response, server closes, client resets), one
// server and one client process; prints wall seconds and the CPU both used per connection. Pinned to
// one CPU (taskset -c 0) it is a low-noise way to compare probe variants (see README.md here).
#define _GNU_SOURCE

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec/1e9;}
int main(int argc,char**argv){
  int n=argc>1?atoi(argv[1]):100000; int port=argc>2?atoi(argv[2]):18080;
  int ls=socket(AF_INET,SOCK_STREAM,0); int one=1; setsockopt(ls,SOL_SOCKET,SO_REUSEADDR,&one,4);
  struct sockaddr_in a={0}; a.sin_family=AF_INET; a.sin_port=htons(port); a.sin_addr.s_addr=htonl(0x7f000001);
  if(bind(ls,(void*)&a,sizeof a)||listen(ls,4096)){perror("bind");return 1;}
  int ready[2]; pipe(ready);
  pid_t srv=fork();
  if(!srv){ char buf[64]; for(int i=0;i<n;i++){int c=accept4(ls,0,0,0); if(c<0){perror("accept");_exit(1);} read(c,buf,sizeof buf); write(c,"HTTP/1.0 200 OK\r\n\r\n",19); close(c);} _exit(0);}
  close(ls);
  // argv[3]: seconds to wait before starting (to attach a tool), or "-": wait for a line on stdin.
  if(argc>3){printf("pid %d\n",getpid());fflush(stdout);
    if(strcmp(argv[3],"-")==0){char line[8]; if(!fgets(line,sizeof line,stdin)) return 1;} else sleep(atoi(argv[3]));}
  double t0=now();
  pid_t cli=fork();
  if(!cli){ char buf[64]; for(int i=0;i<n;i++){int s=socket(AF_INET,SOCK_STREAM,0); if(connect(s,(void*)&a,sizeof a)){perror("connect");_exit(1);} write(s,"GET / HTTP/1.0\r\n\r\n",18); while(read(s,buf,sizeof buf)>0); struct linger lg={1,0}; setsockopt(s,SOL_SOCKET,SO_LINGER,&lg,sizeof lg); close(s);} _exit(0);}
  int st; waitpid(cli,&st,0); waitpid(srv,&st,0);
  double t1=now(); struct rusage ru; getrusage(RUSAGE_CHILDREN,&ru);
  double cpu=ru.ru_utime.tv_sec+ru.ru_utime.tv_usec/1e6+ru.ru_stime.tv_sec+ru.ru_stime.tv_usec/1e6;
  printf("n=%d wall=%.3f cpu=%.3f us_cpu_per_conn=%.3f conn_s=%.0f\n",n,t1-t0,cpu,cpu/n*1e6,n/(t1-t0));
  return 0;}
